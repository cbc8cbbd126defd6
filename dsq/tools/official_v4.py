"""A DeepSeek-V4 checkpoint rewritten in the format of DeepSeek's official V4 weights, for tests.

The official weights mix three precisions under DeepSeek's own tensor names, without the ``model.``
prefix (``embed.weight``, ``layers.N.attn.wq_a.weight``, ``norm.weight``, ``head.weight``, ``hc_head_fn``):

* attention, indexer query and shared-expert Linear weights: FP8 e4m3 in 128 x 128 blocks, each with a
  ``<module>.scale`` of UE8M0 block scales (:mod:`dsq.core.fp8`);
* routed experts (``layers.N.ffn.experts.E.w{1,2,3}.weight``): packed FP4 e2m1, two values per byte along
  the input dimension, with ``<module>.scale`` UE8M0 scales per row and 32 columns (:mod:`dsq.core.fp4`);
* the compressor and indexer projections (``compressor.wkv``, ``compressor.wgate``, ``indexer.weights_proj``):
  BF16 without scales (transformers lists them in ``DeepseekV4PreTrainedModel._keep_in_fp32_modules`` so
  its FP8 quantizer leaves them alone);
* embeddings, norms, router and output head BF16; hyper-connection mixers, attention sinks, compressor
  position biases and the router bias float32; the hash-routing table ``tid2eid`` as stored.

``config.json`` declares it as DeepSeek-V4's does: an FP8 ``quantization_config`` with
``scale_fmt: ue8m0`` and a top-level ``expert_dtype: "fp4"``.

Example:
    >>> from dsq.tools.testing import make_tiny_checkpoint
    >>> src = make_tiny_checkpoint("deepseek_v4", "/tmp/v4")
    >>> write_official_v4(src, "/tmp/v4-official")
    PosixPath('/tmp/v4-official')
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsq.core.checkpoint import (
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    validate_checkpoint,
)
from dsq.core.fp4 import FP4ExpertFormat, quantize_fp4
from dsq.core.fp8 import (
    MODULE_SCALE_SUFFIX,
    FP8BlockFormat,
    fp8_quantization_config,
    quantize_fp8_blocks,
)
from dsq.core.layout import TensorSpec, tensor_specs
from dsq.tools.testing import split_into_shards

FP8_FORMAT = FP8BlockFormat((128, 128), ue8m0_scales=True)
"""The official attention and shared-expert weights: e4m3, 128 x 128 blocks, UE8M0 scales."""

FP4_FORMAT = FP4ExpertFormat(group=32, ue8m0_scales=True)
"""The official routed experts: e2m1, one UE8M0 scale per row and 32 columns."""

BF16_PROJECTIONS: tuple[str, ...] = (".compressor.wkv.weight", ".compressor.wgate.weight", ".indexer.weights_proj.weight")
"""Linear weights the official checkpoint keeps BF16 without scales (the indexer's compressor included)."""

FLOAT32_KINDS: frozenset[str] = frozenset({"router_bias", "other"})
"""Tensor kinds (:data:`dsq.core.layout.KINDS`) stored float32: the router bias and the non-Linear parameters
(hyper-connection ``hc_*``, ``attn_sink``, compressor ``ape``)."""

_TOP_LEVEL_NAMES = {
    "embed_tokens.weight": "embed.weight",
    "hc_head.hc_fn": "hc_head_fn",
    "hc_head.hc_base": "hc_head_base",
    "hc_head.hc_scale": "hc_head_scale",
}
"""Official names of the tensors outside the layers that differ from what transformers saves (transformers'
``conversion_mapping`` "deepseek_v4" renames these back on load)."""


def official_name(name: str) -> str:
    """The official name of a tensor transformers saves as ``name`` (``model.embed_tokens.weight`` -> ``embed.weight``)."""
    stripped = name.removeprefix("model.")
    return _TOP_LEVEL_NAMES.get(stripped, stripped)


def official_config(config: dict) -> dict:
    """``config`` with DeepSeek-V4's declaration of its mixed precision (FP8 UE8M0 blocks, FP4 experts)."""
    return {**config, "dtype": "bfloat16", "expert_dtype": "fp4", "quantization_config": fp8_quantization_config(FP8_FORMAT)}


def write_official_v4(model_dir: str | Path, out_dir: str | Path, *, shards: int = 1) -> Path:
    """Convert a float DeepSeek-V4 checkpoint (as transformers saves it) to the official mixed-precision format.

    Args:
        model_dir: A ``deepseek_v4`` checkpoint with float weights (e.g. from
            :func:`dsq.tools.testing.make_tiny_checkpoint`).
        out_dir: Directory to write (created; must not hold weights already).
        shards: Number of safetensors files (above 1, with an index; a weight and its scales may land in
            different files, as they may in the official shards).

    Returns:
        ``out_dir``.

    Raises:
        CheckpointError: ``model_dir`` is not a valid checkpoint.
        ValueError: It is not a float ``deepseek_v4`` checkpoint, or ``out_dir`` already holds weights.
    """
    files = validate_checkpoint(model_dir)
    if files.model_type != "deepseek_v4" or files.config.get("quantization_config") is not None:
        raise ValueError(f"{files.root} is not a float deepseek_v4 checkpoint (model_type {files.model_type!r})")
    out = Path(out_dir)
    if (out / SAFE_WEIGHTS_NAME).exists() or (out / SAFE_WEIGHTS_INDEX_NAME).exists():
        raise ValueError(f"{out} already holds weights")
    out.mkdir(parents=True, exist_ok=True)
    tensors = dict(_converted(files.root, files.tensors, tensor_specs(files.config)))
    save_file(tensors, str(out / SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
    if shards > 1:
        split_into_shards(out, shards)
    (out / CONFIG_NAME).write_text(json.dumps(official_config(files.config), indent=2) + "\n")
    for entry in files.root.iterdir():  # the tokenizer and anything else beside the weights
        weights = entry.name.endswith(".safetensors") or entry.name == SAFE_WEIGHTS_INDEX_NAME
        if entry.is_file() and entry.name != CONFIG_NAME and not weights:
            shutil.copy2(entry, out / entry.name)
    return out


def _converted(root: Path, stored: dict, specs: list[TensorSpec]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of ``specs`` read from ``root`` and stored the official way (weights, then scales)."""
    for spec in specs:
        if spec.name not in stored:
            raise ValueError(f"{root} has no tensor {spec.name}")
        with safe_open(str(stored[spec.name].file), framework="pt") as handle:
            value = handle.get_tensor(spec.name)
        name = official_name(spec.name)
        module = name.removesuffix(".weight")
        if spec.kind == "expert":
            packed, scale = quantize_fp4(value, FP4_FORMAT)
            yield name, packed
            yield module + MODULE_SCALE_SUFFIX, scale
        elif spec.kind == "linear" and not name.endswith(BF16_PROJECTIONS):
            weight, scale = quantize_fp8_blocks(value, FP8_FORMAT)
            yield name, weight
            yield module + MODULE_SCALE_SUFFIX, scale
        elif spec.kind == "index":
            yield name, value
        else:
            yield name, value.to(torch.float32 if spec.kind in FLOAT32_KINDS else torch.bfloat16)
