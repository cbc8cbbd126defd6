"""Safetensors shard I/O for streaming: read tensors lazily through memory maps, write shards as tensors come.

Reading: :class:`ShardedTensors` knows which shard holds every tensor and reads one on demand,
dequantizing FP8 block-scaled weights (``weight_scale_inv``) on the way; :func:`module_state`
fills a module's state dict from it, assembling transformers' fused MoE experts from the
per-expert tensors on disk. Writing: :class:`ShardWriter` puts every batch of tensors straight
into a part file and groups the parts into shards with an index at the end.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dsq.core.checkpoint import CheckpointFiles
from dsq.core.errors import CheckpointError, QuantizationError
from dsq.core.fp8 import (
    FP8_SAFETENSORS_DTYPE,
    SCALE_SUFFIX,
    FP8BlockFormat,
    dequantize_fp8_blocks,
)
from dsq.core.safetensors_header import StoredTensor, read_safetensors_header

DEFAULT_MAX_SHARD_BYTES = 4 << 30

Reader = Callable[[str, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- reading


class ShardedTensors:
    """Where every tensor of a safetensors checkpoint lives, read lazily through memory maps.

    Which file holds a tensor, and its dtype and shape, come from the headers ``files`` carries
    (a shape the model does not expect is refused before any byte of the tensor is read).

    Args:
        files: a validated checkpoint (:func:`dsq.core.checkpoint.inspect_checkpoint`).
        fp8: the block format when the checkpoint stores FP8 weights with ``weight_scale_inv``.
    """

    def __init__(self, files: CheckpointFiles, fp8: FP8BlockFormat | None = None) -> None:
        self.root = files.root
        self.fp8 = fp8
        self.tensors: Mapping[str, StoredTensor] = files.tensors
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    @contextmanager
    def reader(self) -> Iterator[Reader]:
        """``read(name, like)``: tensor ``name`` as ``like``'s dtype, shape checked.

        Shards are memory-mapped on first use and unmapped when the block ends, so the pages
        read stop counting as resident memory once a layer is done.
        """
        with ExitStack() as stack:
            handles: dict[Path, object] = {}

            def handle(path: Path):
                if path not in handles:
                    handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
                return handles[path]

            def read(name: str, like: torch.Tensor) -> torch.Tensor:
                stored = self._stored(name)
                if stored.shape != tuple(like.shape):
                    raise CheckpointError(
                        f"{stored.file}: tensor {name} has shape {stored.shape}, "
                        f"the model needs {tuple(like.shape)}"
                    )
                return self._read(handle, name, stored, like.dtype)

            yield read

    def _stored(self, name: str) -> StoredTensor:
        stored = self.tensors.get(name)
        if stored is None:
            raise CheckpointError(f"checkpoint {self.root} has no tensor {name}, which the model needs")
        return stored

    def _read(self, handle: Callable, name: str, stored: StoredTensor, dtype: torch.dtype) -> torch.Tensor:
        self.used.add(name)
        scale_name = name + SCALE_SUFFIX
        scale = self.tensors.get(scale_name)
        if self.fp8 is not None and scale is not None:
            self.used.add(scale_name)
            raw = handle(stored.file).get_tensor(name)
            return dequantize_fp8_blocks(name, raw, handle(scale.file).get_tensor(scale_name), self.fp8, dtype=dtype)
        if stored.dtype == FP8_SAFETENSORS_DTYPE:
            raise CheckpointError(
                f"{stored.file}: tensor {name} is float8_e4m3fn but the checkpoint has no {scale_name} "
                "(or config.json declares no fp8 quantization_config)"
            )
        return handle(stored.file).get_tensor(name).to(dtype=dtype, copy=True)

    def unused(self) -> list[str]:
        """Tensors in the checkpoint that nothing read (e.g. DeepSeek-V3's multi-token-prediction layer)."""
        return sorted(set(self.tensors) - self.used)


def module_state(module: nn.Module, prefix: str, read: Reader) -> dict[str, torch.Tensor]:
    """The state dict of ``module`` (full name ``prefix``) read from the checkpoint.

    transformers 5 fuses DeepSeek's routed experts in memory (``experts.gate_up_proj``
    ``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``); on disk they are one tensor per expert
    (``experts.{e}.{gate,up,down}_proj.weight``). Fused tensors are filled expert by expert.
    """
    state: dict[str, torch.Tensor] = {}
    for key, like in module.state_dict(keep_vars=True).items():
        full = f"{prefix}.{key}" if prefix else key
        if key.endswith("experts.gate_up_proj"):
            state[key] = _fused(full[: -len(".gate_up_proj")], like, ("gate_proj", "up_proj"), read)
        elif key.endswith("experts.down_proj"):
            state[key] = _fused(full[: -len(".down_proj")], like, ("down_proj",), read)
        else:
            state[key] = read(full, like)
    return state


def _fused(prefix: str, like: torch.Tensor, projections: tuple[str, ...], read: Reader) -> torch.Tensor:
    """``[E, rows, cols]`` from each expert's projections stacked along rows (gate above up)."""
    out = torch.empty(like.shape, dtype=like.dtype)
    rows = like.shape[1] // len(projections)
    for e in range(like.shape[0]):
        for j, proj in enumerate(projections):
            out[e, j * rows:(j + 1) * rows] = read(f"{prefix}.{e}.{proj}.weight", like[e, j * rows:(j + 1) * rows])
    return out


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """Writes tensors to disk as they come and gathers them into shards of at most ``max_shard_bytes``.

    Each :meth:`add` goes straight to a part file, so nothing waits in memory for a shard to fill;
    :meth:`close` groups consecutive parts into shards (one part: renamed; several: their bytes
    copied in 64 MiB chunks under one header) and writes the index.

    Args:
        root: the output directory.
        max_shard_bytes: the largest shard (a single larger part gets a shard of its own).
    """

    def __init__(self, root: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.root = root
        self.max_shard_bytes = max_shard_bytes
        self.parts: list[tuple[Path, int]] = []  # (file, tensor bytes)
        self.total = 0

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not tensors:
            return
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise QuantizationError(f"tensor {name} has NaN or inf values; refusing to write the artifact")
        path = self.root / f".part-{len(self.parts):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        self.parts.append((path, size))
        self.total += size

    def _groups(self) -> list[list[Path]]:
        groups: list[list[Path]] = []
        used = 0
        for path, size in self.parts:
            if not groups or (used + size > self.max_shard_bytes and groups[-1]):
                groups.append([])
                used = 0
            groups[-1].append(path)
            used += size
        return groups

    def close(self) -> list[str]:
        """Name the shards as transformers expects, with an index when there is more than one."""
        groups = self._groups()
        if len(groups) == 1:
            _merge(groups[0], self.root / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for i, group in enumerate(groups, 1):
            name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            weight_map.update({t: name for t in _merge(group, self.root / name)})
            names.append(name)
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


_COPY_CHUNK = 64 << 20


def _merge(parts: list[Path], target: Path) -> list[str]:
    """Concatenate safetensors files into ``target`` without loading their tensors; returns the names."""
    if len(parts) == 1:
        header, _ = read_safetensors_header(parts[0])
        parts[0].rename(target)
        return [k for k in header if k != "__metadata__"]
    entries: dict[str, dict] = {}
    sources: list[tuple[Path, int, int]] = []  # (file, data start, data length)
    offset = 0
    for part in parts:
        header, header_len = read_safetensors_header(part)
        start = 8 + header_len
        length = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            entries[name] = {**entry, "data_offsets": [begin + offset, end + offset]}
            length = max(length, end)
        sources.append((part, start, length))
        offset += length
    blob = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(target, "wb") as out:
        out.write(len(blob).to_bytes(8, "little"))
        out.write(blob)
        for part, start, length in sources:
            with open(part, "rb") as src:
                src.seek(start)
                left = length
                while left:
                    chunk = src.read(min(_COPY_CHUNK, left))
                    if not chunk:
                        raise QuantizationError(f"{part}: truncated while writing {target.name}")
                    out.write(chunk)
                    left -= len(chunk)
            part.unlink()
    return list(entries)
