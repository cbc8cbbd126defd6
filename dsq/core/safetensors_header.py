"""Safetensors headers, parsed and validated without reading any tensor data.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name to
``{"dtype", "shape", "data_offsets"}``, plus an optional ``"__metadata__"`` object) and the data
section the offsets point into. :func:`read_header` parses one header into a
:class:`SafetensorsHeader`; a checkpoint's headers are read once, by
:func:`dsq.core.checkpoint.inspect_checkpoint`, and carried in its
:class:`~dsq.core.checkpoint.CheckpointFiles` to everything that needs them.

Example:
    >>> header = read_header(Path("ckpt/model.safetensors"))
    >>> header.tensors["model.embed_tokens.weight"].shape
    (512, 128)
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dsq.core.errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000
"""Largest safetensors header accepted (the limit the safetensors library itself uses)."""

SAFETENSORS_DTYPE_BITS: Mapping[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
"""Bits per element of every safetensors dtype."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a safetensors header describes it.

    Attributes:
        file: The safetensors file that holds it.
        dtype: Its safetensors dtype (``BF16``, ``F8_E4M3`` ...).
        shape: Its shape.
        data_offsets: ``(start, end)`` of its bytes in the file's data section.
    """

    file: Path
    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of one safetensors file.

    Attributes:
        path: The file.
        header_len: Length of the JSON header in bytes (the data section starts at ``8 + header_len``).
        size: The file's size in bytes when the header was read.
        tensors: Tensor name to :class:`StoredTensor`, in header order.
        metadata: The ``__metadata__`` object (None when the header has none).
    """

    path: Path
    header_len: int
    size: int
    tensors: Mapping[str, StoredTensor]
    metadata: Mapping[str, Any] | None = None

    @property
    def data_start(self) -> int:
        """Byte offset of the data section in the file."""
        return 8 + self.header_len


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file (see :func:`read_safetensors_header`).

    Args:
        path: The ``.safetensors`` file.

    Returns:
        The header, its tensors as :class:`StoredTensor`.

    Raises:
        CheckpointError: The file is missing, unreadable, corrupt or truncated.
    """
    path = Path(path)
    header, header_len, size = _read_validated(path)
    tensors = {
        name: StoredTensor(path, entry["dtype"], tuple(entry["shape"]), tuple(entry["data_offsets"]))
        for name, entry in header.items()
        if name != "__metadata__"
    }
    metadata = header.get("__metadata__")
    return SafetensorsHeader(
        path=path,
        header_len=header_len,
        size=size,
        tensors=MappingProxyType(tensors),
        metadata=MappingProxyType(metadata) if metadata is not None else None,
    )


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and validate the header of a safetensors file without reading tensor data.

    Checks that the header length is sane, the header is a JSON object, every tensor
    has a known dtype and a shape whose byte size equals its ``data_offsets`` span, the
    tensors tile the data section without gaps or overlaps, and the file size equals
    ``8 + header_len + end of the last tensor`` (a truncated file is reported with the
    expected and actual sizes).

    Args:
        path: The ``.safetensors`` file.

    Returns:
        The parsed header (tensor name to ``{"dtype", "shape", "data_offsets"}``, plus
        ``"__metadata__"`` when present) and the header length in bytes.

    Raises:
        CheckpointError: The file is missing, unreadable, corrupt or truncated.
    """
    header, header_len, _ = _read_validated(Path(path))
    return header, header_len


def stored_tensors(headers: Sequence[SafetensorsHeader], index: Mapping[str, Any] | None = None) -> dict[str, StoredTensor]:
    """Every tensor of a checkpoint from its parsed safetensors headers.

    Args:
        headers: The header of each weight file.
        index: The parsed shard index, if any: a tensor counts in the shard the index names.

    Returns:
        Tensor name to :class:`StoredTensor`.
    """
    weight_map = index.get("weight_map") if index is not None else None
    stored: dict[str, StoredTensor] = {}
    for header in headers:
        for name, tensor in header.tensors.items():
            if weight_map is None or weight_map.get(name) == header.path.name:
                stored[name] = tensor
    return stored


def file_size(path: Path) -> int:
    """The size of ``path`` in bytes.

    Raises:
        CheckpointError: It cannot be read.
    """
    try:
        return path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc


def _read_validated(path: Path) -> tuple[dict[str, Any], int, int]:
    """The parsed header, its length and the file size, every entry checked."""
    size = file_size(path)
    header_len, raw = _read_raw_header(path, size)
    header = _parse_header_json(path, raw)
    data_end = _check_tensor_entries(path, header)
    expected_size = 8 + header_len + data_end
    if size != expected_size:
        problem = "is truncated" if size < expected_size else "has trailing bytes"
        raise CheckpointError(
            f"safetensors file {path} {problem}: its header implies {expected_size} bytes "
            f"(8 + {header_len} header + {data_end} data) but the file has {size} bytes"
        )
    return header, header_len, size


def _read_raw_header(path: Path, size: int) -> tuple[int, bytes]:
    """Return the header length and the raw header bytes (without the length prefix)."""
    if size < 8:
        raise CheckpointError(f"safetensors file {path} is {size} bytes, too small to hold a header")
    try:
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len == 0 or header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"safetensors file {path} is corrupt: header length {header_len} is "
                    f"impossible for a file of {size} bytes"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc
    return header_len, raw


def _parse_header_json(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"safetensors file {path} is corrupt: its header is not valid JSON ({exc})"
        ) from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"safetensors file {path} is corrupt: its header is not a JSON object")
    metadata = header.get("__metadata__")
    if metadata is not None and not isinstance(metadata, dict):
        raise CheckpointError(f"safetensors file {path} is corrupt: __metadata__ is not an object")
    return header


def _check_tensor_entries(path: Path, header: Mapping[str, Any]) -> int:
    """Validate every tensor entry; return the end offset of the data section."""
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        spans.append(_check_tensor_entry(path, name, entry))
    spans.sort()
    position = 0
    for start, end, name in spans:
        if start != position:
            raise CheckpointError(
                f"safetensors file {path} is corrupt: tensor {name!r} starts at data offset "
                f"{start}, expected {position} (tensor data overlaps or has a gap)"
            )
        position = end
    return position


def _check_tensor_entry(path: Path, name: str, entry: Any) -> tuple[int, int, str]:
    if not isinstance(entry, dict):
        raise CheckpointError(f"safetensors file {path} is corrupt: entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    bits = SAFETENSORS_DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is None:
        raise CheckpointError(
            f"safetensors file {path}: tensor {name!r} has unknown dtype {dtype!r}"
        )
    if not _is_int_list(shape) or any(dim < 0 for dim in shape):
        raise CheckpointError(f"safetensors file {path}: tensor {name!r} has invalid shape {shape!r}")
    if not _is_int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise CheckpointError(
            f"safetensors file {path}: tensor {name!r} has invalid data_offsets {offsets!r}"
        )
    start, end = offsets
    expected_bytes = math.ceil(math.prod(shape) * bits / 8)
    if end - start != expected_bytes:
        raise CheckpointError(
            f"safetensors file {path}: tensor {name!r} ({dtype}, shape {shape}) needs "
            f"{expected_bytes} bytes but data_offsets {offsets} span {end - start}"
        )
    return start, end, name


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    )
