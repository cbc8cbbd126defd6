"""Saving a quantized model as a dsq artifact: compressed-tensors weights in shards, config, tokenizer."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from dsq import __version__
from dsq.core.atomic import _OS_ERROR

if TYPE_CHECKING:
    import torch

def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' ``save_file``; its I/O failures raised as the ``OSError`` they are."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        found = _OS_ERROR.search(str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


def save_weights(tensors: dict[str, torch.Tensor], root: Path, *, max_shard_bytes: int = 4 << 30) -> list[str]:
    """Write tensors as one ``model.safetensors`` or as shards plus an index.

    Raises:
        OSError: a file cannot be written (a full disk, ...), naming it.
    """
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    total = sum(sizes.values())
    if total <= max_shard_bytes:
        _save_file(tensors, root / "model.safetensors")
        return ["model.safetensors"]
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for key in sorted(tensors):
        if used + sizes[key] > max_shard_bytes and shards[-1]:
            shards.append({})
            used = 0
        shards[-1][key] = tensors[key]
        used += sizes[key]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_file(shard, root / name)
        names.append(name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def copy_tokenizer(tokenizer, root: Path) -> None:
    tokenizer.save_pretrained(str(root))


def save_quantized_model(
    model, tokenizer, root: Path, *, dtype_name: str = "float32", max_shard_bytes: int = 4 << 30
) -> list[str]:
    """Write a dsq-quantized transformers model as a compressed-tensors HF directory.

    Tied embeddings (:mod:`dsq.core.tied`): an fp ``lm_head`` that is the input embedding's tensor is
    written once and config.json keeps ``tie_word_embeddings: true``; a quantized ``lm_head`` is
    written beside the fp embedding with ``tie_word_embeddings: false`` (the report's note:
    :func:`dsq.core.tied.tie_notes`).

    Args:
        model: model whose quantized modules are dsq ``QuantLinear`` / ``QuantExperts``.
        tokenizer: saved beside the weights.
        root: an existing, empty directory.
        dtype_name: the dtype recorded in config.json for the unquantized tensors.
        max_shard_bytes: weight files of at most this size (with an index when more than one).

    Returns:
        The weight file names written.
    """
    import torch

    from dsq.quantize.compressed_tensors_format import compress_model

    from dsq.core.errors import QuantizationError
    from dsq.core.tied import drop_tied_duplicate, tied_embeddings, untie_config

    checkpoint = compress_model(model, __version__)
    tie = tied_embeddings(model)
    tensors = drop_tied_duplicate(checkpoint.tensors, tie)
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise QuantizationError(f"tensor {name} has NaN or inf values; refusing to write the artifact")
    files = save_weights(tensors, root, max_shard_bytes=max_shard_bytes)
    config = untie_config(model.config.to_dict(), tie)
    config["quantization_config"] = checkpoint.quantization_config
    config["dtype"] = dtype_name
    write_config(config, root)
    copy_tokenizer(tokenizer, root)
    return files


def write_config(config_dict: dict, root: Path) -> None:
    (root / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
