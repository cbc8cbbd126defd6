"""Read a dsq (compressed-tensors) artifact back into dsq's own quantized modules.

This is dsq's forward of an artifact: packed weights stay packed in memory and are
dequantized in the forward, exactly as after ``quantize_``. It reads every scheme dsq
writes, including the ones transformers cannot read back (asymmetric fused experts, W8A8
experts), and zero points in every layout dsq has written (int32 packed along ``out`` as
``[ceil(out*bits/32), groups]`` or row-padded ``[out, groups]``, and int8 ``[out, groups]``).
Groups with ``input_activations`` (int8 token-dynamic, tensor-dynamic asymmetric or tensor-static) become
:class:`~dsq.quantize.w8a8.W8A8Linear` / :class:`~dsq.quantize.w8a8.W8A8Experts`. A ``kv_cache_scheme``
attaches dsq's KV-cache quantization (:mod:`dsq.quantize.kv_cache`) with the stored ``k_scale`` / ``v_scale``,
so every forward of the loaded model, with a cache or without, sees the quantized keys and values.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from dsq.quantize.artifact_check import (
    check_quantized_tensors, check_weight_shapes, group_for, parse_kv_cache_scheme, parse_quantization_config,
    read_tensor_specs,
)
from dsq.core.checkpoint import inspect_checkpoint, source_info
from dsq.core.loading import LoadedModel
from dsq.core.errors import CheckpointError, QuantizationError
from dsq.core.tied import tied_embeddings
from dsq.core.layout import ExpertProjections, expert_projections
from dsq.quantize.compressed_tensors_format import decompress_tensor
from dsq.quantize.kv_cache import KVCacheUnsupported, attach_kv_cache_quantization, freeze_kv_scales
from dsq.quantize.modules import GatedActivation, QuantExperts, QuantLinear, is_fused_experts, linear_groups, set_module
from dsq.quantize.primitives import QuantizedWeight, stack_weights
from dsq.quantize.w8a8 import StaticPerTensor, W8A8Experts, W8A8Linear


def _read_tensors(files) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


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
        CheckpointError: not a compressed-tensors artifact; a ``quantization_config`` key dsq does not read
            (named, see :mod:`dsq.quantize.artifact_check`); a tensor missing, unexpected or of the wrong shape or
            dtype for its module (named). All of these are found before any quantized module is built. A
            ``kv_cache_scheme`` for an architecture whose KV cache dsq does not quantize, or a ``k_scale`` /
            ``v_scale`` that is not finite and positive (named).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = Path(path)
    files = inspect_checkpoint(root)
    groups = parse_quantization_config(files.config.get("quantization_config"), root / "config.json")
    kv_scheme = parse_kv_cache_scheme(files.config["quantization_config"], root / "config.json")
    config = AutoConfig.from_pretrained(str(root), local_files_only=True)
    del config.quantization_config  # build the plain model; dsq swaps in its own modules
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    packed = check_quantized_tensors(model, groups, read_tensor_specs(files.weight_files), root)
    tensors = _read_tensors(files.weight_files)
    check_weight_shapes(tensors, packed, root)
    names = expert_projections(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            group = group_for(name, groups)
            if group is None:
                continue
            qw = decompress_tensor(tensors, name, group.scheme)
            bias = tensors.pop(f"{name}.bias", None)
            act = group.activations
            if act is None:
                new = QuantLinear(qw, bias, scale_dtype=qw.scale.dtype, n_groups=linear_groups(module))
            else:
                new = W8A8Linear(qw, bias, act, _input_scale(tensors, name, act, root), linear_groups(module))
            _take_prefix(tensors, name)
            set_module(model, name, new)
        elif is_fused_experts(module):
            group = group_for(f"{name}.0.{names.gate}", groups)
            if group is None:
                continue
            scheme, act = group.scheme, group.activations
            if act is None:
                new = _load_experts(tensors, name, module, scheme, root, names)
            else:
                new = _load_w8a8_experts(tensors, name, module, scheme, act, root, names)
            set_module(model, name, new)
            _take_prefix(tensors, name)
    _attach_kv_cache(model, kv_scheme, root)
    _load_rest(model, tensors, root, names)
    if kv_scheme is not None:
        _freeze_loaded_scales(model, root)
    tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source_info(files))


def _attach_kv_cache(model: nn.Module, scheme, root: Path) -> None:
    """KV-cache quantization with empty ``k_scale`` / ``v_scale`` buffers, filled by :func:`_load_rest`."""
    if scheme is None:
        return
    try:
        attach_kv_cache_quantization(model, scheme)
    except KVCacheUnsupported as exc:
        raise CheckpointError(f"{root / 'config.json'}: quantization_config.kv_cache_scheme: {exc}") from None


def _freeze_loaded_scales(model: nn.Module, root: Path) -> None:
    try:
        freeze_kv_scales(model, from_amax=False)
    except QuantizationError as exc:
        raise CheckpointError(f"{root}: {exc}") from None


def _require(tensors: dict, key: str, root: Path) -> None:
    if key not in tensors:
        raise CheckpointError(f"{root}: tensor {key} is missing from the artifact")


def _read_expert(tensors: dict, name: str, e: int, scheme, root: Path,
                 names: ExpertProjections) -> tuple[QuantizedWeight, QuantizedWeight]:
    """Expert ``e``'s (gate_up ``[2I, H]``, down ``[H, I]``) quantized weights."""
    for proj in names.names:
        _require(tensors, f"{name}.{e}.{proj}.weight_scale", root)
    gate = decompress_tensor(tensors, f"{name}.{e}.{names.gate}", scheme)
    up = decompress_tensor(tensors, f"{name}.{e}.{names.up}", scheme)
    return _cat_rows(gate, up), decompress_tensor(tensors, f"{name}.{e}.{names.down}", scheme)


def _load_experts(tensors: dict, name: str, module: nn.Module, scheme, root: Path, names: ExpertProjections) -> QuantExperts:
    gate_up, down = [], []
    for e in range(module.gate_up_proj.shape[0]):
        gu, dn = _read_expert(tensors, name, e, scheme, root, names)
        gate_up.append(gu)
        down.append(dn)
    scale_dtype = gate_up[0].scale.dtype
    return QuantExperts(stack_weights(gate_up), stack_weights(down), GatedActivation.of(module), scale_dtype)


def _input_scale(tensors: dict, prefix: str, act, root: Path) -> torch.Tensor | None:
    if not isinstance(act, StaticPerTensor):
        return None
    _require(tensors, f"{prefix}.input_scale", root)
    return tensors[f"{prefix}.input_scale"]


def _load_w8a8_experts(tensors: dict, name: str, module: nn.Module, scheme, act, root: Path,
                       names: ExpertProjections) -> W8A8Experts:
    gate_up, down, gu_scales, dn_scales = [], [], [], []
    for e in range(module.gate_up_proj.shape[0]):
        gu, dn = _read_expert(tensors, name, e, scheme, root, names)
        gate_up.append(gu)
        down.append(dn)
        if isinstance(act, StaticPerTensor):
            g = _input_scale(tensors, f"{name}.{e}.{names.gate}", act, root)
            u = _input_scale(tensors, f"{name}.{e}.{names.up}", act, root)
            if not torch.equal(g, u):
                raise CheckpointError(f"{root}: {name}.{e} {names.gate} and {names.up} read the same input but have different input scales")
            gu_scales.append(g.reshape(()))
            dn_scales.append(_input_scale(tensors, f"{name}.{e}.{names.down}", act, root).reshape(()))
    gu = torch.stack(gu_scales) if gu_scales else None
    dn = torch.stack(dn_scales) if dn_scales else None
    return W8A8Experts(stack_weights(gate_up), stack_weights(down), GatedActivation.of(module), act, gu, dn)


def _load_rest(model: nn.Module, tensors: dict[str, torch.Tensor], root: Path, names: ExpertProjections) -> None:
    """Unquantized tensors; per-expert ``.weight`` tensors are fused back into 3-D parameters.

    Raises:
        CheckpointError: a tensor missing, one the model does not have, or one of the wrong shape (named).
    """
    reference = model.state_dict()
    state = {}
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.match(rf"(.*\.experts)\.(\d+)\.({names.pattern})\.weight$", key)
        if m:
            experts.setdefault(m.group(1), {})[f"{m.group(2)}.{m.group(3)}"] = value
        else:
            state[key] = value
    for prefix, parts in experts.items():
        state |= _fuse_experts(prefix, parts, reference, root, names)
    quantized = [n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantExperts, W8A8Linear, W8A8Experts))]
    expected = {k for k in reference if not any(k.startswith(q + ".") for q in quantized)}
    tie = tied_embeddings(model)
    if tie is not None and tie.kept and tie.output_name not in state:
        expected.discard(tie.output_name)  # written once, under the embedding's name
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(f"{root}: tensors missing from the artifact: {', '.join(missing[:10])}")
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise CheckpointError(f"{root}: tensors the model does not have: {', '.join(unexpected[:10])}")
    for key, value in state.items():
        if value.shape != reference[key].shape:
            raise CheckpointError(
                f"{root}: tensor {key} has shape {list(value.shape)}, the model built from config.json has {list(reference[key].shape)}"
            )
    model.load_state_dict(state, strict=False)


def _fuse_experts(prefix: str, parts: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                  root: Path, names: ExpertProjections) -> dict[str, torch.Tensor]:
    """Per-expert ``{e}.{gate,up,down}_proj`` weights -> the model's fused ``gate_up_proj`` / ``down_proj``."""
    gate_up, down = reference.get(f"{prefix}.gate_up_proj"), reference.get(f"{prefix}.down_proj")
    if gate_up is None or down is None or gate_up.dim() != 3:
        raise CheckpointError(f"{root}: tensors {prefix}.N.*_proj.weight belong to no fused experts of the model")
    experts, two_inter, hidden = gate_up.shape  # (E, 2I, H); down (E, H, I)
    shapes = {(e, proj): shape for e in range(experts) for proj, shape in
              ((names.gate, (two_inter // 2, hidden)), (names.up, (two_inter // 2, hidden)), (names.down, tuple(down.shape[1:])))}
    for (e, proj), shape in shapes.items():
        name = f"{prefix}.{e}.{proj}.weight"
        part = parts.get(f"{e}.{proj}")
        if part is None:
            raise CheckpointError(f"{root}: tensor {name} is missing from the artifact ({experts} experts in config.json)")
        if tuple(part.shape) != shape:
            raise CheckpointError(f"{root}: tensor {name} has shape {list(part.shape)}, expected {list(shape)} from config.json")
    extra = sorted(set(parts) - {f"{e}.{proj}" for e, proj in shapes})
    if extra:
        raise CheckpointError(f"{root}: tensor {prefix}.{extra[0]}.weight: the model has {experts} experts in {prefix}")
    fused_gate_up = torch.stack([torch.cat([parts[f"{e}.{names.gate}"], parts[f"{e}.{names.up}"]]) for e in range(experts)])
    return {f"{prefix}.gate_up_proj": fused_gate_up,
            f"{prefix}.down_proj": torch.stack([parts[f"{e}.{names.down}"] for e in range(experts)])}
