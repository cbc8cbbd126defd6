"""Read a dsq (compressed-tensors) artifact back into dsq's own quantized modules.

This is dsq's forward of an artifact: packed weights stay packed in memory and are
dequantized in the forward, exactly as after ``quantize_``. It reads every scheme dsq
writes, including the ones transformers cannot read back (asymmetric int4, W8A8 experts).
Groups with ``input_activations`` (int8 token-dynamic or tensor-static) become
:class:`~dsq.quantize.w8a8.W8A8Linear` / :class:`~dsq.quantize.w8a8.W8A8Experts`.
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
from dsq.quantize.primitives import QuantizedWeight, stack_weights
from dsq.quantize.w8a8 import WEIGHT_SCHEME as W8A8_WEIGHT_SCHEME
from dsq.quantize.w8a8 import DynamicPerToken, StaticPerTensor, W8A8Experts, W8A8Linear


def _read_tensors(files) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def _group_for(name: str, groups: list[tuple[re.Pattern, dict]]) -> dict | None:
    """The config group (``weights``, ``input_activations``) whose target matches ``name``."""
    for pattern, group in groups:
        if pattern.search(name):
            return group
    return None


def _compile_groups(qconfig: dict) -> list[tuple[re.Pattern, dict]]:
    groups = []
    for group in qconfig.get("config_groups", {}).values():
        for target in group.get("targets", []):
            if not target.startswith("re:"):
                raise CheckpointError(f"config group target {target!r} is not a module-name pattern dsq wrote")
            groups.append((re.compile(target[3:]), group))
    return groups


def _activation_scheme(group: dict, root: Path):
    """None (weight-only), DynamicPerToken or StaticPerTensor from a group's ``input_activations``."""
    args = group.get("input_activations")
    if not args:
        return None
    if scheme_from_args(group["weights"]) != W8A8_WEIGHT_SCHEME:
        raise CheckpointError(f"{root}: int8 input activations need int8 per-channel symmetric weights, got {group['weights']}")
    if args.get("type", "int") != "int" or args.get("num_bits") != 8 or not args.get("symmetric", True):
        raise CheckpointError(f"{root}: unsupported input_activations {args}: dsq reads symmetric int8 activations")
    strategy, dynamic = args.get("strategy"), args.get("dynamic")
    if strategy == "token" and dynamic is True:
        return DynamicPerToken()
    if strategy == "tensor" and dynamic is False:
        return StaticPerTensor()
    raise CheckpointError(
        f"{root}: unsupported input_activations strategy {strategy!r} with dynamic={dynamic!r} "
        "(dsq reads token/dynamic and tensor/static)"
    )


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
        A :class:`LoadedModel` whose model holds ``QuantLinear`` / ``QuantExperts`` (weight-only
        groups) or ``W8A8Linear`` / ``W8A8Experts`` (groups with int8 input activations).

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
            group = _group_for(name, groups)
            if group is None:
                continue
            _require(tensors, f"{name}.weight_scale", root)
            qw = decompress_tensor(tensors, name, scheme_from_args(group["weights"]))
            bias = tensors.pop(f"{name}.bias", None)
            act = _activation_scheme(group, root)
            if act is None:
                new = QuantLinear(qw, bias, scale_dtype=qw.scale.dtype)
            else:
                new = W8A8Linear(qw, bias, act, _input_scale(tensors, name, act, root))
            _take_prefix(tensors, name)
            set_module(model, name, new)
        elif is_fused_experts(module):
            group = _group_for(f"{name}.0.gate_proj", groups)
            if group is None:
                continue
            scheme = scheme_from_args(group["weights"])
            act = _activation_scheme(group, root)
            if act is None:
                new = _load_experts(tensors, name, module, scheme, root)
            else:
                new = _load_w8a8_experts(tensors, name, module, scheme, act, root)
            set_module(model, name, new)
            _take_prefix(tensors, name)
    _load_rest(model, tensors, root)
    tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source_info(files))


def _require(tensors: dict, key: str, root: Path) -> None:
    if key not in tensors:
        raise CheckpointError(f"{root}: tensor {key} is missing from the artifact")


def _read_expert(tensors: dict, name: str, e: int, scheme, root: Path) -> tuple[QuantizedWeight, QuantizedWeight]:
    """Expert ``e``'s (gate_up ``[2I, H]``, down ``[H, I]``) quantized weights."""
    for proj in ("gate_proj", "up_proj", "down_proj"):
        _require(tensors, f"{name}.{e}.{proj}.weight_scale", root)
    gate = decompress_tensor(tensors, f"{name}.{e}.gate_proj", scheme)
    up = decompress_tensor(tensors, f"{name}.{e}.up_proj", scheme)
    return _cat_rows(gate, up), decompress_tensor(tensors, f"{name}.{e}.down_proj", scheme)


def _load_experts(tensors: dict, name: str, module: nn.Module, scheme, root: Path) -> QuantExperts:
    gate_up, down = [], []
    for e in range(module.gate_up_proj.shape[0]):
        gu, dn = _read_expert(tensors, name, e, scheme, root)
        gate_up.append(gu)
        down.append(dn)
    scale_dtype = gate_up[0].scale.dtype
    return QuantExperts(stack_weights(gate_up), stack_weights(down), module.act_fn, scale_dtype)


def _input_scale(tensors: dict, prefix: str, act, root: Path) -> torch.Tensor | None:
    if not isinstance(act, StaticPerTensor):
        return None
    _require(tensors, f"{prefix}.input_scale", root)
    return tensors[f"{prefix}.input_scale"]


def _load_w8a8_experts(tensors: dict, name: str, module: nn.Module, scheme, act, root: Path) -> W8A8Experts:
    gate_up, down, gu_scales, dn_scales = [], [], [], []
    for e in range(module.gate_up_proj.shape[0]):
        gu, dn = _read_expert(tensors, name, e, scheme, root)
        gate_up.append(gu)
        down.append(dn)
        if isinstance(act, StaticPerTensor):
            g, u = _input_scale(tensors, f"{name}.{e}.gate_proj", act, root), _input_scale(tensors, f"{name}.{e}.up_proj", act, root)
            if not torch.equal(g, u):
                raise CheckpointError(f"{root}: {name}.{e} gate_proj and up_proj read the same input but have different input scales")
            gu_scales.append(g.reshape(()))
            dn_scales.append(_input_scale(tensors, f"{name}.{e}.down_proj", act, root).reshape(()))
    gu = torch.stack(gu_scales) if gu_scales else None
    dn = torch.stack(dn_scales) if dn_scales else None
    return W8A8Experts(stack_weights(gate_up), stack_weights(down), module.act_fn, act, gu, dn)


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
    quantized = [n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantExperts, W8A8Linear, W8A8Experts))]
    expected = {k for k in model.state_dict() if not any(k.startswith(q + ".") for q in quantized)}
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(f"{root}: tensors missing from the artifact: {', '.join(missing[:10])}")
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise CheckpointError(f"{root}: tensors the model does not have: {', '.join(unexpected[:10])}")
    model.load_state_dict(state, strict=False)
