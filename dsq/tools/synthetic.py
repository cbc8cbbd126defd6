"""Synthetic checkpoints of any supported architecture, written tensor by tensor.

Benchmarks of memory and speed on large DeepSeek-V3-shaped models need checkpoints of realistic
size and layout, with no download and without ever holding the whole model in memory. This module

- builds DeepSeek-V3-shaped ``config.json`` dicts (:func:`deepseek_v3_config`),
- lists the tensors transformers expects on disk for a config (:func:`tensor_specs`), derived from
  the model instantiated on the meta device, with fused MoE experts split into one tensor per
  expert as the original checkpoints store them,
- writes a sharded checkpoint (:func:`write_synthetic_checkpoint`): each tensor is generated from
  ``(seed, tensor name)`` alone, a shard at a time, optionally with the Linear weights of the
  decoder layers in the FP8 block-scaled layout of the official DeepSeek-V3/R1 checkpoints.

Because a tensor depends only on the seed and its name, the FP8 checkpoint of a seed is exactly the
block quantization (:func:`dsq.core.fp8.quantize_fp8_blocks`) of the weights of the same seed's
unquantized checkpoint in the same ``dtype``; every other tensor is identical in both.

Example:
    >>> cfg = deepseek_v3_config(hidden_size=256, num_layers=2, num_experts=4, moe_intermediate_size=128)
    >>> root = write_synthetic_checkpoint("/tmp/v3-fp8", cfg, fp8=True)  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from dsq.core.checkpoint import (
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    TOKENIZER_FILES,
    bundled_model_path,
)
from dsq.core.fp8 import FP8BlockFormat, fp8_quantization_config, quantize_fp8_blocks, scale_name
from dsq.core.layout import FP8_KINDS, TensorSpec, tensor_specs

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 2**30
"""Default largest shard (1 GiB): writing holds one shard in memory."""

WEIGHT_STD = 0.02
"""Standard deviation of generated weights (DeepSeek's ``initializer_range``)."""

NORM_NOISE_STD = 0.02
"""Norm weights are ``1 + N(0, NORM_NOISE_STD)``."""

GENERATION_CHUNK_ELEMENTS = 2**24
"""Tensors are generated in row chunks of about this many fp32 values (bounds the fp32 scratch)."""

_FILE_OVERHEAD = 8 + 64
"""safetensors length prefix, ``{"__metadata__":{"format":"pt"}}`` and padding to 8 bytes."""

_TEMPLATE_DROP: tuple[str, ...] = ("transformers_version", "quantization_config")


# --------------------------------------------------------------------------- configs


def _round_up(value: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(value / multiple)) * multiple)


def deepseek_v3_config(
    *,
    hidden_size: int,
    num_layers: int,
    num_experts: int,
    moe_intermediate_size: int,
    intermediate_size: int | None = None,
    vocab_size: int = 2048,
    first_k_dense_replace: int = 1,
    q_lora_rank: int | None = None,
    kv_lora_rank: int | None = None,
    heads: int | None = None,
    qk_nope_head_dim: int = 128,
    qk_rope_head_dim: int = 64,
    v_head_dim: int = 128,
    num_experts_per_tok: int | None = None,
    n_shared_experts: int = 1,
    n_group: int = 1,
    topk_group: int = 1,
    max_position_embeddings: int = 4096,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, Any]:
    """A DeepSeek-V3-shaped ``config.json`` dict (the bundled tiny model's config as template).

    Sizes left as ``None`` follow DeepSeek-V3's proportions to ``hidden_size`` (7168 -> dense MLP
    18432, q LoRA rank 1536, kv LoRA rank 512), rounded up to multiples of 64; ``heads`` defaults
    to ``hidden_size // 128`` (at least 1).

    Args:
        hidden_size: Model width.
        num_layers: Decoder layers; the first ``first_k_dense_replace`` have a dense MLP.
        num_experts: Routed experts per MoE layer.
        moe_intermediate_size: Width of each routed (and shared) expert.
        intermediate_size: Width of the dense MLPs.
        vocab_size: Vocabulary size; must cover the bundled tokenizer (2048) to use it.
        first_k_dense_replace: Layers with a dense MLP before the MoE layers.
        q_lora_rank: Rank of the query down-projection; 0 for direct ``q_proj`` (V2-Lite style).
        kv_lora_rank: Rank of the compressed KV.
        heads: Attention heads (also key/value heads, as in DeepSeek-V3).
        qk_nope_head_dim: Per-head query/key dimension without rotary embedding.
        qk_rope_head_dim: Per-head rotary dimension.
        v_head_dim: Per-head value dimension.
        num_experts_per_tok: Routed experts per token (default ``min(8, num_experts)``).
        n_shared_experts: Shared experts per MoE layer.
        n_group: Expert groups for group-limited routing (must divide ``num_experts``).
        topk_group: Groups each token may route to.
        max_position_embeddings: Longest sequence.
        dtype: The ``dtype`` recorded in the config.

    Returns:
        The config dict, ready for ``json.dump`` and :func:`tensor_specs`.

    Raises:
        ValueError: A size is not positive, or the routing settings are inconsistent.
    """
    scale = hidden_size / 7168
    if intermediate_size is None:
        intermediate_size = _round_up(18432 * scale, 64)
    if q_lora_rank is None:
        q_lora_rank = _round_up(1536 * scale, 64)
    if kv_lora_rank is None:
        kv_lora_rank = _round_up(512 * scale, 64)
    if heads is None:
        heads = max(1, hidden_size // 128)
    if num_experts_per_tok is None:
        num_experts_per_tok = min(8, num_experts)
    sizes = {
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_experts": num_experts,
        "moe_intermediate_size": moe_intermediate_size,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "kv_lora_rank": kv_lora_rank,
        "heads": heads,
        "qk_nope_head_dim": qk_nope_head_dim,
        "qk_rope_head_dim": qk_rope_head_dim,
        "v_head_dim": v_head_dim,
        "num_experts_per_tok": num_experts_per_tok,
        "n_group": n_group,
        "topk_group": topk_group,
    }
    counts = {
        "q_lora_rank": q_lora_rank, "first_k_dense_replace": first_k_dense_replace, "n_shared_experts": n_shared_experts
    }
    _check_v3_sizes(sizes, counts)
    return _v3_config_from_template(sizes, counts, max_position_embeddings=max_position_embeddings, dtype=dtype)


def _check_v3_sizes(sizes: dict[str, Any], counts: dict[str, int]) -> None:
    """Raise ``ValueError`` unless every size is a positive integer, every count is >= 0 and the
    routing settings fit together."""
    bad = [f"{k}={v!r}" for k, v in sizes.items() if not isinstance(v, int) or v <= 0]
    if bad or any(v < 0 for v in counts.values()):
        got = ", ".join(bad) or "a negative rank/count"
        raise ValueError(f"deepseek_v3_config: sizes must be positive integers, got {got}")
    num_experts, n_group = sizes["num_experts"], sizes["n_group"]
    if sizes["num_experts_per_tok"] > num_experts or num_experts % n_group or sizes["topk_group"] > n_group:
        raise ValueError(
            f"deepseek_v3_config: inconsistent routing: num_experts={num_experts}, "
            f"num_experts_per_tok={sizes['num_experts_per_tok']}, n_group={n_group}, topk_group={sizes['topk_group']}"
        )


def _v3_config_from_template(
    sizes: dict[str, int], counts: dict[str, int], *, max_position_embeddings: int, dtype: torch.dtype
) -> dict[str, Any]:
    """The bundled tiny model's ``config.json`` with the sizes of :func:`deepseek_v3_config` put in."""
    template = json.loads((bundled_model_path() / CONFIG_NAME).read_text())
    config = {k: v for k, v in template.items() if k not in _TEMPLATE_DROP}
    config.update(
        {
            "dtype": str(dtype).removeprefix("torch."),
            "hidden_size": sizes["hidden_size"],
            "num_hidden_layers": sizes["num_layers"],
            "n_routed_experts": sizes["num_experts"],
            "moe_intermediate_size": sizes["moe_intermediate_size"],
            "intermediate_size": sizes["intermediate_size"],
            "vocab_size": sizes["vocab_size"],
            "first_k_dense_replace": counts["first_k_dense_replace"],
            "q_lora_rank": counts["q_lora_rank"] or None,
            "kv_lora_rank": sizes["kv_lora_rank"],
            "num_attention_heads": sizes["heads"],
            "num_key_value_heads": sizes["heads"],
            "qk_nope_head_dim": sizes["qk_nope_head_dim"],
            "qk_rope_head_dim": sizes["qk_rope_head_dim"],
            "qk_head_dim": sizes["qk_nope_head_dim"] + sizes["qk_rope_head_dim"],
            "head_dim": sizes["qk_rope_head_dim"],
            "v_head_dim": sizes["v_head_dim"],
            "num_experts_per_tok": sizes["num_experts_per_tok"],
            "n_shared_experts": counts["n_shared_experts"],
            "n_group": sizes["n_group"],
            "topk_group": sizes["topk_group"],
            "max_position_embeddings": max_position_embeddings,
            # No multi-token-prediction layer is written, so none is declared.
            "num_nextn_predict_layers": 0,
        }
    )
    return config


# --------------------------------------------------------------------------- generation


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generate_tensor(spec: TensorSpec, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.Tensor:
    """The value of one synthetic tensor: a function of ``(seed, spec.name)``, shape and kind only.

    Weights are ``N(0, 0.02)``, norms ``1 + N(0, 0.02)``, the router's score-correction bias zeros
    (kept in float32, as in DeepSeek's checkpoints). Values are drawn in float32 in row chunks
    (at most :data:`GENERATION_CHUNK_ELEMENTS` scratch values) and rounded to ``dtype``.

    Args:
        spec: The tensor.
        dtype: Storage dtype (float32, bfloat16 or float16).
        seed: Checkpoint seed.

    Returns:
        A contiguous CPU tensor of ``spec.shape``.
    """
    if spec.kind == "router_bias":
        return torch.zeros(spec.shape, dtype=torch.float32)
    out = torch.empty(spec.shape, dtype=dtype)
    gen = torch.Generator().manual_seed(_seed_for(seed, spec.name))
    mean = 1.0 if spec.kind == "norm" else 0.0
    std = NORM_NOISE_STD if spec.kind == "norm" else WEIGHT_STD
    rows = out.view(-1, spec.shape[-1]) if len(spec.shape) > 1 else out.view(1, -1)
    step = max(1, GENERATION_CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step]
        chunk.copy_(torch.empty(chunk.shape, dtype=torch.float32).normal_(mean, std, generator=gen))
    return out


def _stored(spec: TensorSpec, dtype: torch.dtype, fp8: FP8BlockFormat | None) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, data bytes) of each tensor written for ``spec``."""
    if fp8 is not None and spec.kind in FP8_KINDS:
        scales = fp8.scale_shape(spec.shape)
        return [(spec.name, spec.shape, spec.numel), (scale_name(spec.name), scales, 4 * math.prod(scales))]
    itemsize = 4 if spec.kind == "router_bias" else dtype.itemsize
    return [(spec.name, spec.shape, spec.numel * itemsize)]


def _file_bytes(name: str, shape: tuple[int, ...], nbytes: int) -> int:
    """Upper bound of what one tensor adds to a safetensors file: its data and its header entry.

    The entry is ``"name":{"dtype":"F8_E4M3","shape":[...],"data_offsets":[a,b]},``: at most the
    name, 60 bytes of keys and punctuation, 21 per offset and 21 per dimension.
    """
    return nbytes + len(name.encode()) + 60 + 2 * 21 + 21 * len(shape)


def _materialise(spec: TensorSpec, dtype: torch.dtype, fp8: FP8BlockFormat | None, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    value = generate_tensor(spec, dtype=dtype, seed=seed)
    if fp8 is not None and spec.kind in FP8_KINDS:
        q, scale = quantize_fp8_blocks(value, fp8)
        del value
        yield spec.name, q
        yield scale_name(spec.name), scale
    else:
        yield spec.name, value


def plan_shards(
    specs: list[TensorSpec], *, dtype: torch.dtype, fp8: FP8BlockFormat | None, max_shard_bytes: int
) -> list[list[TensorSpec]]:
    """Group ``specs`` in order into shard files of at most ``max_shard_bytes`` each.

    The size counted is the file's: tensor data plus an upper bound of the safetensors header.
    A tensor larger than the limit gets a shard of its own; an FP8 weight and its scale share one.

    Args:
        specs: The tensors, in writing order.
        dtype: Storage dtype of unquantized tensors.
        fp8: The FP8 format of quantized kinds, or None.
        max_shard_bytes: Largest shard file size in bytes.

    Returns:
        The shards, each a non-empty list of specs.
    """
    shards: list[list[TensorSpec]] = [[]]
    size = _FILE_OVERHEAD
    for spec in specs:
        nbytes = sum(_file_bytes(*stored) for stored in _stored(spec, dtype, fp8))
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = _FILE_OVERHEAD
        shards[-1].append(spec)
        size += nbytes
    return shards if shards[0] else []


def _copy_tokenizer(root: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer

    source = bundled_model_path()
    length = Tokenizer.from_file(str(source / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    if vocab_size < length:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the bundled tokenizer's {length} tokens")
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, root / name)


def write_synthetic_checkpoint(
    root: str | Path,
    config: Mapping[str, Any],
    *,
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    seed: int = 0,
    fp8_block: tuple[int, int] = (128, 128),
) -> Path:
    """Write a synthetic checkpoint of ``config``, one shard in memory at a time.

    Every tensor of :func:`tensor_specs` is generated by :func:`generate_tensor` (a function of
    ``seed`` and its name), so the same seed gives the same weights whatever the sharding. With
    ``fp8`` the Linear weights inside the decoder layers (attention, dense and shared MLPs, every
    routed expert) are stored as float8_e4m3fn with float32 ``weight_scale_inv`` block scales, as in
    the official DeepSeek-V3/R1 checkpoints: the block quantization of the very weights the
    unquantized checkpoint of the same seed and ``dtype`` holds. The directory gets ``config.json``
    (with ``quantization_config`` when ``fp8``), the bundled tokenizer, and either one
    ``model.safetensors`` or shards ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` (``weight_map`` and ``metadata.total_size``).

    Args:
        root: Output directory; created if missing, must be empty if it exists.
        config: A ``config.json`` dict of a supported model type (see :func:`deepseek_v3_config`).
        dtype: Storage dtype of the unquantized tensors (bfloat16, float16 or float32).
        fp8: Store the decoder layers' Linear weights in FP8 block-scaled form.
        max_shard_bytes: Largest shard file (data and header); a single larger tensor gets its own shard.
        seed: Seed of every generated tensor.
        fp8_block: FP8 block shape (rows, columns).

    Returns:
        ``root`` as a :class:`Path`.

    Raises:
        ValueError: Unsupported dtype or model type, or a vocabulary smaller than the tokenizer.
        FileExistsError: ``root`` exists and is not empty.
    """
    root = _check_output(root, dtype, max_shard_bytes)
    fmt = FP8BlockFormat(tuple(fp8_block)) if fp8 else None
    specs = tensor_specs(config)
    shards = plan_shards(specs, dtype=dtype, fp8=fmt, max_shard_bytes=max_shard_bytes)

    root.mkdir(parents=True, exist_ok=True)
    _copy_tokenizer(root, int(config.get("vocab_size", 0)))
    out_config = {k: v for k, v in config.items() if k != "quantization_config"}
    out_config["dtype"] = str(dtype).removeprefix("torch.")
    if fmt is not None:
        out_config["quantization_config"] = fp8_quantization_config(fmt)
    weight_map, total = _write_shards(root, shards, dtype=dtype, fmt=fmt, seed=seed)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (root / CONFIG_NAME).write_text(json.dumps(out_config, indent=2, sort_keys=True) + "\n")
    return root


def _check_output(root: str | Path, dtype: torch.dtype, max_shard_bytes: int) -> Path:
    """``root`` as a Path, after checking the dtype, the shard limit and that ``root`` is empty or absent."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not empty")
    return root


def _write_shards(
    root: Path, shards: list[list[TensorSpec]], *, dtype: torch.dtype, fmt: FP8BlockFormat | None, seed: int
) -> tuple[dict[str, str], int]:
    """Generate and write each shard in turn (one in memory at a time).

    Returns:
        ``(weight_map, total data bytes)``: the file of every tensor name, as the index records it.
    """
    from safetensors.torch import save_file

    names = (
        [SAFE_WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    weight_map: dict[str, str] = {}
    total = 0
    for file_name, shard in zip(names, shards):
        tensors: dict[str, torch.Tensor] = {}
        for spec in shard:
            tensors.update(_materialise(spec, dtype, fmt, seed))
        save_file(tensors, str(root / file_name), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file_name))
        logger.debug("wrote %s (%d tensors)", file_name, len(tensors))
        del tensors
    return weight_map, total


__all__ = [
    "DEFAULT_SHARD_BYTES",
    "FP8_KINDS",
    "TensorSpec",
    "deepseek_v3_config",
    "generate_tensor",
    "plan_shards",
    "tensor_specs",
    "write_synthetic_checkpoint",
]
