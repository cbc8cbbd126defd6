"""Read a dsq (compressed-tensors) artifact back into dsq's own quantized modules.

This is dsq's forward of an artifact: packed weights stay packed in memory and are
dequantized in the forward, exactly as after ``quantize_``. It reads every scheme dsq
writes, including the ones transformers cannot read back (asymmetric int4).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .checkpoint import LoadedModel, inspect_checkpoint, source_info
from .errors import CheckpointError
from dsq.quantize.compressed_tensors_format import decompress_tensor, scheme_from_args
from dsq.quantize.modules import QuantExperts, QuantLinear, is_fused_experts, set_module
from dsq.quantize.primitives import QuantizedWeight


def _read_tensors(files) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def _group_for(name: str, groups: list[tuple[re.Pattern, dict]]) -> dict | None:
    for pattern, args in groups:
        if pattern.search(name):
            return args
    return None


def _compile_groups(qconfig: dict) -> list[tuple[re.Pattern, dict]]:
    groups = []
    for group in qconfig.get("config_groups", {}).values():
        for target in group.get("targets", []):
            if not target.startswith("re:"):
                raise CheckpointError(f"config group target {target!r} is not a module-name pattern dsq wrote")
            groups.append((re.compile(target[3:]), group["weights"]))
    return groups


def _stack(qws: list[QuantizedWeight]) -> QuantizedWeight:
    zero = torch.stack([q.zero for q in qws]) if qws[0].zero is not None else None
    return QuantizedWeight(torch.stack([q.qweight for q in qws]), torch.stack([q.scale for q in qws]), zero, qws[0].scheme)


def _cat_rows(a: QuantizedWeight, b: QuantizedWeight) -> QuantizedWeight:
    zero = torch.cat([a.zero, b.zero]) if a.zero is not None else None
    return QuantizedWeight(torch.cat([a.qweight, b.qweight]), torch.cat([a.scale, b.scale]), zero, a.scheme)


def _take_prefix(tensors: dict, prefix: str) -> None:
    for key in [k for k in tensors if k.startswith(prefix + ".")]:
        del tensors[key]


def load_artifact(path: str | Path, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a dsq artifact with dsq's quantized modules.

    Args:
        path: artifact directory (config.json with a compressed-tensors quantization_config).
        dtype: dtype of the unquantized tensors and of the computation.

    Returns:
        A :class:`LoadedModel` whose model holds ``QuantLinear`` / ``QuantExperts``.

    Raises:
        CheckpointError: not a compressed-tensors artifact, or a tensor is missing.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = Path(path)
    files = inspect_checkpoint(root)
    raw = json.loads((root / "config.json").read_text())
    qconfig = raw.get("quantization_config")
    if not qconfig or qconfig.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"{root / 'config.json'} has no compressed-tensors quantization_config")
    groups = _compile_groups(qconfig)
    config = AutoConfig.from_pretrained(str(root), local_files_only=True)
    del config.quantization_config  # build the plain model; dsq swaps in its own modules
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    tensors = _read_tensors(files.weight_files)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            args = _group_for(name, groups)
            if args is None:
                continue
            _require(tensors, f"{name}.weight_scale", root)
            qw = decompress_tensor(tensors, name, scheme_from_args(args))
            bias = tensors.pop(f"{name}.bias", None)
            _take_prefix(tensors, name)
            set_module(model, name, QuantLinear(qw, bias, scale_dtype=qw.scale.dtype))
        elif is_fused_experts(module):
            args = _group_for(f"{name}.0.gate_proj", groups)
            if args is None:
                continue
            set_module(model, name, _load_experts(tensors, name, module, scheme_from_args(args), root))
            _take_prefix(tensors, name)
    _load_rest(model, tensors, root)
    tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source_info(files))


def _require(tensors: dict, key: str, root: Path) -> None:
    if key not in tensors:
        raise CheckpointError(f"{root}: tensor {key} is missing from the artifact")


def _load_experts(tensors: dict, name: str, module: nn.Module, scheme, root: Path) -> QuantExperts:
    gate_up, down = [], []
    for e in range(module.gate_up_proj.shape[0]):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            _require(tensors, f"{name}.{e}.{proj}.weight_scale", root)
        gate = decompress_tensor(tensors, f"{name}.{e}.gate_proj", scheme)
        up = decompress_tensor(tensors, f"{name}.{e}.up_proj", scheme)
        gate_up.append(_cat_rows(gate, up))
        down.append(decompress_tensor(tensors, f"{name}.{e}.down_proj", scheme))
    scale_dtype = gate_up[0].scale.dtype
    return QuantExperts(_stack(gate_up), _stack(down), module.act_fn, scale_dtype)


def _load_rest(model: nn.Module, tensors: dict[str, torch.Tensor], root: Path) -> None:
    """Unquantized tensors; per-expert ``.weight`` tensors are fused back into 3-D parameters."""
    state = {}
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.match(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", key)
        if m:
            experts.setdefault(m.group(1), {})[f"{m.group(2)}.{m.group(3)}"] = value
        else:
            state[key] = value
    for prefix, parts in experts.items():
        n = len(parts) // 3
        state[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[f"{e}.gate_proj"], parts[f"{e}.up_proj"]]) for e in range(n)])
        state[f"{prefix}.down_proj"] = torch.stack([parts[f"{e}.down_proj"] for e in range(n)])
    quantized = [n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantExperts))]
    expected = {k for k in model.state_dict() if not any(k.startswith(q + ".") for q in quantized)}
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(f"{root}: tensors missing from the artifact: {', '.join(missing[:10])}")
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise CheckpointError(f"{root}: tensors the model does not have: {', '.join(unexpected[:10])}")
    model.load_state_dict(state, strict=False)
