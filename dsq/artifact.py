"""Artifacts: a quantized model written as a loadable HF directory, atomically.

Layout of an artifact directory::

    config.json            model config + quantization_config (compressed-tensors)
    model.safetensors      weights (quantized tensors in compressed-tensors layout)
    tokenizer*.json ...    the source tokenizer
    recipe.yaml            the resolved recipe that produced it
    report.json/.md        evaluation against the original
    manifest.json          sha256 of every other file, versions, source identity

Everything is written into a temporary sibling directory that is renamed into place only
when the run has succeeded, so a failed run leaves no artifact behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from . import __version__
from .errors import DsqInputError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    import transformers

    found = {"dsq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
             "python": platform.python_version()}
    with contextlib.suppress(ImportError):
        import compressed_tensors

        found["compressed_tensors"] = compressed_tensors.__version__
    return found


@dataclass(frozen=True)
class Manifest:
    files: dict[str, str]  # relative path -> sha256
    versions: dict[str, str]
    source: dict
    extra: dict

    def to_dict(self) -> dict:
        return {"version": MANIFEST_VERSION, "kind": "dsq-artifact", "files": self.files,
                "versions": self.versions, "source": self.source, **self.extra}


def write_manifest(root: Path, source: dict, extra: dict | None = None) -> Manifest:
    """Hash every file under ``root`` (except the manifest) and write ``manifest.json``."""
    files = {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = Manifest(files=files, versions=versions(), source=source, extra=extra or {})
    (root / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return manifest


def save_weights(tensors: dict[str, torch.Tensor], root: Path, *, max_shard_bytes: int = 4 << 30) -> list[str]:
    """Write tensors as one ``model.safetensors`` or as shards plus an index."""
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    total = sum(sizes.values())
    if total <= max_shard_bytes:
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
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
        save_file(shard, str(root / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def prepare_output(output: Path, overwrite: bool, marker: str = MANIFEST) -> None:
    """Refuse to clobber an existing directory unless asked; never clobber one without ``marker``."""
    if not output.exists():
        return
    if not output.is_dir():
        raise DsqInputError(f"output {output} exists and is not a directory")
    if not overwrite:
        raise DsqInputError(f"output directory {output} already exists; pass overwrite=true to replace it")
    if output.is_dir() and not (output / marker).exists() and any(output.iterdir()):
        raise DsqInputError(f"output directory {output} exists and has no {marker} (not written by dsq); refusing to replace it")


@contextlib.contextmanager
def atomic_directory(output: Path, overwrite: bool, marker: str = MANIFEST) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``output`` only if the block succeeds.

    An existing ``output`` is replaced only with ``overwrite`` and only if it holds ``marker``.
    """
    prepare_output(output, overwrite, marker)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)


def copy_tokenizer(tokenizer, root: Path) -> None:
    tokenizer.save_pretrained(str(root))


def save_quantized_model(
    model, tokenizer, root: Path, *, dtype_name: str = "float32", max_shard_bytes: int = 4 << 30
) -> list[str]:
    """Write a dsq-quantized transformers model as a compressed-tensors HF directory.

    Args:
        model: model whose quantized modules are dsq ``QuantLinear`` / ``QuantExperts``.
        tokenizer: saved beside the weights.
        root: an existing, empty directory.
        dtype_name: the dtype recorded in config.json for the unquantized tensors.
        max_shard_bytes: weight files of at most this size (with an index when more than one).

    Returns:
        The weight file names written.
    """
    from dsq.quantize.compressed_tensors_format import compress_model

    from .errors import QuantizationError

    checkpoint = compress_model(model, __version__)
    for name, tensor in checkpoint.tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise QuantizationError(f"tensor {name} has NaN or inf values; refusing to write the artifact")
    files = save_weights(checkpoint.tensors, root, max_shard_bytes=max_shard_bytes)
    config = model.config.to_dict()
    config["quantization_config"] = checkpoint.quantization_config
    config["dtype"] = dtype_name
    write_config(config, root)
    copy_tokenizer(tokenizer, root)
    return files


def write_config(config_dict: dict, root: Path) -> None:
    (root / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
