"""Safetensors shard I/O for streaming: read tensors lazily through memory maps, write shards as tensors come.

Reading: :class:`ShardedTensors` knows which shard holds every tensor and reads one on demand,
dequantizing FP8 block-scaled weights (``weight_scale_inv``, or DeepSeek-V4's ``.scale``) and
DeepSeek-V4's packed FP4 experts on the way; :func:`module_state` fills a module's state dict from it,
assembling transformers' fused MoE experts from the per-expert tensors on disk. Tensors are asked for
by the model's names; a checkpoint that stores them under other names transformers loads (no
``model.`` prefix; DeepSeek-V4's own names, ``layers.1.attn.wq_a.weight``) is read under those.
Writing: :class:`ShardWriter` puts every batch of tensors straight
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

from dsq.core.checkpoint import CONFIG_NAME, CheckpointFiles
from dsq.core.config_checks import model_facts
from dsq.core.errors import CheckpointError, QuantizationError
from dsq.core.fp4 import FP4_SAFETENSORS_DTYPES, dequantize_fp4, fp4_format
from dsq.core.fp8 import (
    FP8_SAFETENSORS_DTYPE,
    FP8BlockFormat,
    dequantize_fp8_blocks,
    find_scale,
    scale_names,
)
from dsq.core.header_checks import EXPERT_KEY, stored_names
from dsq.core.layout import OWN_DISK_NAMES, SUPPORTED_MODEL_TYPES, disk_names
from dsq.core.safetensors_header import StoredTensor, read_safetensors_header

DEFAULT_MAX_SHARD_BYTES = 4 << 30

Reader = Callable[[str, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- reading


class ShardedTensors:
    """Where every tensor of a safetensors checkpoint lives, read lazily through memory maps.

    Which file holds a tensor, and its dtype and shape, come from the headers ``files`` carries
    (a shape the model does not expect is refused before any byte of the tensor is read). Packed FP4
    experts are read when config.json declares them (:func:`dsq.core.fp4.fp4_format`).

    Args:
        files: a validated checkpoint (:func:`dsq.core.checkpoint.inspect_checkpoint`).
        fp8: the block format when the checkpoint stores FP8 weights with block scales.
    """

    def __init__(self, files: CheckpointFiles, fp8: FP8BlockFormat | None = None) -> None:
        self.root = files.root
        self.fp8 = fp8
        self.fp4 = fp4_format(files.config)
        self.tensors: Mapping[str, StoredTensor] = files.tensors
        self.used: set[str] = set()
        self._files = files
        self._names: Mapping[str, str] | None = None

    def __contains__(self, name: str) -> bool:
        return self.stored_name(name) in self.tensors

    def stored_name(self, name: str) -> str:
        """The name the files hold the model's tensor ``name`` under (``name`` itself for most checkpoints)."""
        if name in self.tensors and self._files.model_type not in OWN_DISK_NAMES:
            return name
        if self._names is None:
            self._names = stored_name_table(self._files)
        return self._names.get(name, name)

    @contextmanager
    def reader(self) -> Iterator[Reader]:
        """``read(name, like)``: the model's tensor ``name`` as ``like``'s dtype, shape checked.

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
                stored_name = self.stored_name(name)
                stored = self._stored(stored_name, name)
                scale_name = find_scale(stored_name, self.tensors)
                fp4 = self._is_fp4(stored, scale_name, like)
                want = self.fp4.packed_shape(like.shape) if fp4 else tuple(like.shape)
                if stored.shape != want:
                    packing = f" (packed FP4 of {tuple(like.shape)})" if fp4 else ""
                    raise CheckpointError(
                        f"{stored.file}: tensor {stored_name} has shape {stored.shape}, the model needs {want}{packing}"
                    )
                return self._read(handle, stored_name, stored, scale_name, like.dtype)

            yield read

    def _stored(self, stored_name: str, name: str) -> StoredTensor:
        stored = self.tensors.get(stored_name)
        if stored is None:
            also = f" (stored as {stored_name})" if stored_name != name else ""
            raise CheckpointError(f"checkpoint {self.root} has no tensor {name}{also}, which the model needs")
        return stored

    def _is_fp4(self, stored: StoredTensor, scale_name: str | None, like: torch.Tensor) -> bool:
        """A packed FP4 expert (DeepSeek-V4): int8 codes with scales, where the model holds floats."""
        return (
            self.fp4 is not None and scale_name is not None and stored.dtype in FP4_SAFETENSORS_DTYPES
            and like.dtype.is_floating_point and len(like.shape) == 2
        )

    def _read(
        self, handle: Callable, name: str, stored: StoredTensor, scale_name: str | None, dtype: torch.dtype
    ) -> torch.Tensor:
        self.used.add(name)
        if scale_name is not None and self.fp4 is not None and stored.dtype in FP4_SAFETENSORS_DTYPES:
            self.used.add(scale_name)
            scale = handle(self.tensors[scale_name].file).get_tensor(scale_name)
            raw = handle(stored.file).get_tensor(name)
            return dequantize_fp4(name, raw, scale, self.fp4, dtype=dtype, scale_label=scale_name)
        if scale_name is not None and self.fp8 is not None:
            self.used.add(scale_name)
            scale = handle(self.tensors[scale_name].file).get_tensor(scale_name)
            raw = handle(stored.file).get_tensor(name)
            return dequantize_fp8_blocks(name, raw, scale, self.fp8, dtype=dtype, scale_label=scale_name)
        if stored.dtype == FP8_SAFETENSORS_DTYPE:
            raise CheckpointError(
                f"{stored.file}: tensor {name} is float8_e4m3fn but the checkpoint has no scales "
                f"({' or '.join(scale_names(name))}) or config.json declares no fp8 quantization_config"
            )
        if stored.dtype in FP4_SAFETENSORS_DTYPES and dtype.is_floating_point:
            raise CheckpointError(
                f"{stored.file}: tensor {name} is {stored.dtype} (packed FP4) where the model needs floating point, "
                f"but the checkpoint has no scales ({' or '.join(scale_names(name))}) or config.json declares no "
                "expert_dtype fp4"
            )
        return handle(stored.file).get_tensor(name).to(dtype=dtype, copy=True)

    def unused(self) -> list[str]:
        """Tensors in the checkpoint that nothing read (e.g. DeepSeek-V3's multi-token-prediction layer)."""
        return sorted(set(self.tensors) - self.used)


def stored_name_table(files: CheckpointFiles) -> dict[str, str]:
    """The model's tensor names -> the names ``files`` stores them under, where they differ.

    Most checkpoints store the model's own names (maybe without the ``model.`` prefix). DeepSeek-V4's
    keep theirs (:data:`dsq.core.layout.OWN_DISK_NAMES`): every parameter is named the way transformers
    saves it (:func:`dsq.core.layout.disk_names`), and each routed expert's projection under the name
    :func:`module_state` asks for (``mlp.experts.3.gate_proj.weight`` -> ``ffn.experts.3.w1.weight``).

    Args:
        files: A checkpoint of a supported model type (others: an empty table).

    Returns:
        Asked name -> stored name.
    """
    if files.model_type not in SUPPORTED_MODEL_TYPES:
        return {}
    facts = model_facts(files.config, files.root / CONFIG_NAME)
    aliases = stored_names(facts.tensors, files.tensors, facts.model)
    if files.model_type not in OWN_DISK_NAMES:
        return aliases
    return {asked: aliases.get(disk, disk) for asked, disk in _model_disk_names(facts.model).items()}


_FUSED_PROJECTIONS: Mapping[str, tuple[str, ...]] = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
"""transformers' fused expert parameters and the per-expert projections :func:`module_state` reads them from, in order."""


def _model_disk_names(model: nn.Module) -> dict[str, str]:
    """Every model tensor's name -> its on-disk name as transformers saves it (fused experts: per expert)."""
    table: dict[str, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        disk = [name for name, _ in disk_names(model, key, tensor)]
        stem, _, leaf = key.rpartition(".")
        if len(disk) == 1:
            table[key] = disk[0]
            continue
        projections = _FUSED_PROJECTIONS.get(leaf) if stem.endswith("experts") else None
        if projections is None:
            raise CheckpointError(f"cannot tell which on-disk tensor of {key} holds which part: {', '.join(disk[:4])}")
        table.update(_per_expert(key, stem, projections, disk))
    return table


def _per_expert(key: str, stem: str, projections: tuple[str, ...], disk: list[str]) -> dict[str, str]:
    """``{stem}.{e}.{projection}.weight`` -> on-disk name, the on-disk tensors grouped by projection in the order
    transformers unfuses them (its ``Concatenate`` reversed: the first projection's experts first)."""
    by_projection: dict[str, dict[int, str]] = {}
    for name in disk:
        match = EXPERT_KEY.match(name)
        if match is None:
            raise CheckpointError(f"on-disk tensor {name} of {key} is not named as one expert's")
        by_projection.setdefault(match["suffix"], {})[int(match["index"])] = name
    if len(by_projection) != len(projections):
        raise CheckpointError(f"{key} is stored as {', '.join(by_projection)}, expected {len(projections)} projection(s)")
    return {
        f"{stem}.{index}.{projection}.weight": name
        for projection, experts in zip(projections, by_projection.values(), strict=True)
        for index, name in experts.items()
    }


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
