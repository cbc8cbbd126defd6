"""A checkpoint loaded one decoder layer at a time: a skeleton on the meta device, then each layer from the shards.

Used for FP8 block-scaled checkpoints (dequantized by the declared block, shard by shard), DeepSeek-V4's
official ones (FP8 blocks with UE8M0 scales, packed FP4 routed experts; see :mod:`dsq.core.fp4`) and by
streamed quantization, which walks the same skeleton.
"""
from __future__ import annotations

import ctypes
import gc
import logging
from pathlib import Path

import torch
from torch import nn

from dsq.core.checkpoint import CheckpointFiles
from dsq.core.errors import CheckpointError
from dsq.core.fp8 import fp8_format
from dsq.core.layout import decoder_layers, set_module
from dsq.core.shards import ShardedTensors, module_state

log = logging.getLogger(__name__)

def build_skeleton(root: Path, *, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The causal LM of ``root`` with every stored tensor on ``meta`` (no memory, no weights read).

    Buffers computed from the config rather than stored (rotary ``inv_freq``) are built on the CPU, in
    the decoder layers too (DeepSeek-V4's compressors hold their own rotary embedding).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    remote = {"trust_remote_code": True} if trust_remote_code else {}
    config = AutoConfig.from_pretrained(str(root), local_files_only=True, **remote)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # FP8 and FP4 weights are dequantized while reading
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **remote)
    model.eval()
    _build_computed_buffers(model)
    return model


def _build_computed_buffers(model: nn.Module) -> None:
    """Rebuild on the CPU every module whose buffers are all non-persistent and on ``meta`` (nothing to read)."""
    stored = set(model.state_dict(keep_vars=True))
    for name, module in list(model.named_modules()):
        own = [f"{name}.{b}" if name else b for b, t in module.named_buffers(recurse=False) if t.is_meta]
        has_parameters = any(True for _ in module.parameters(recurse=False))
        if own and not has_parameters and stored.isdisjoint(own):
            _rebuild(model, name, module)


def materialize_outside_layers(model: nn.Module, layers_prefix: str, source: ShardedTensors) -> None:
    """Read every tensor outside the decoder layers; rebuild non-persistent buffers (rotary tables)."""
    state = model.state_dict(keep_vars=True)
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and "lm_head.weight" not in source
    keys = [k for k in state if not k.startswith(layers_prefix + ".") and not (tied and k == "lm_head.weight")]
    with source.reader() as read:
        values = {k: read(k, state[k]) for k in keys}
    model.load_state_dict(values, strict=False, assign=True)
    for name, module in list(model.named_modules()):
        if name.startswith(layers_prefix):
            continue
        if any(b.is_meta for b in module.buffers(recurse=False)):
            _rebuild(model, name, module)
    if tied:
        model.tie_weights()
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta and not n.startswith(layers_prefix + ".")]
    if left:
        raise CheckpointError(f"checkpoint {source.root}: no value for {', '.join(left[:5])}")


def _rebuild(model: nn.Module, name: str, module: nn.Module) -> None:
    """A module whose buffers are computed, not stored (rotary ``inv_freq``): build it again on CPU."""
    try:
        with torch.device("cpu"):
            fresh = type(module)(config=model.config)
    except TypeError as exc:
        raise CheckpointError(f"{name} ({type(module).__name__}) has computed buffers that cannot be rebuilt: {exc}") from exc
    set_module(model, name, fresh)


def _return_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise, and RSS would creep up layer by layer)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _holder(name: str, module: nn.Module) -> nn.Module:
    """A container in which ``module`` has the full name ``name`` (e.g. ``model.layers.3``)."""
    root = nn.Module()
    parent = root
    *path, last = name.split(".")
    for part in path:
        child = nn.Module()
        parent.add_module(part, child)
        parent = child
    parent.add_module(last, module)
    return root


def load_model_by_layers(files: CheckpointFiles, *, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The whole model in memory, read tensor by tensor the way streaming reads it (FP8 dequantized)."""
    source = ShardedTensors(files, fp8=fp8_format(files.config))
    model = build_skeleton(files.root, dtype=dtype, trust_remote_code=trust_remote_code)
    prefix, layers = decoder_layers(model)
    materialize_outside_layers(model, prefix, source)
    for i, layer in enumerate(layers):
        with source.reader() as read:
            layer.load_state_dict(module_state(layer, f"{prefix}.{i}", read), strict=True, assign=True)
    unused = source.unused()
    if unused:
        log.warning("checkpoint %s: %d tensor(s) not used by the model (e.g. %s)", files.root, len(unused), ", ".join(unused[:3]))
    return model
