"""Loading local Hugging Face checkpoints safely.

A checkpoint is a directory with ``config.json``, safetensors weights (one
``model.safetensors`` or shards listed in ``model.safetensors.index.json``) and a
tokenizer. Everything is validated before any weight is read: the directory layout,
the config and its field types, every safetensors header (offsets, sizes, dtypes), the
shard index, and the headers against the model the config describes (decoder layer and
expert counts, every tensor's shape and dtype; see :mod:`dsq.core.checkpoint_checks`). Pickle-based
weights are refused outright and never unpickled. Loading is local only; the hub is
never contacted.

Tensors the model needs but the files lack are errors (:func:`validate_checkpoint`):
transformers would otherwise initialise them randomly. A tokenizer with more tokens than
``vocab_size`` is an error too; one with fewer is a note.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any


from dsq.core.errors import CheckpointError

from dsq.core.fp8 import fp8_format
from dsq.core.layout import SUPPORTED_MODEL_TYPES
from dsq.core.checkpoint_checks import (
    HeaderCheck, check_config_types, check_expert_counts, check_headers_against_config,
    describe_missing, model_facts, name_some, stored_tensors,
)

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "tiktoken.model",
)
BUNDLED_MODEL_DIR = "tiny_deepseek_v3"

MAX_HEADER_BYTES = 100_000_000
"""Largest safetensors header accepted (the limit the safetensors library itself uses)."""

FINGERPRINT_FULL_HASH_BYTES = 64 * 2**20
"""Weight files whose data section is at most this large are fingerprinted byte for byte."""

FINGERPRINT_SAMPLE_BLOCKS = 16
"""Number of evenly spaced data blocks (first and last included) hashed for larger files."""

FINGERPRINT_BLOCK_BYTES = 64 * 2**10
"""Size of each sampled data block."""

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
class SourceInfo:
    """Identity of a source checkpoint, recorded in artifact manifests.

    Attributes:
        path: Absolute path of the checkpoint directory.
        model_type: ``model_type`` from ``config.json``.
        architectures: ``architectures`` from ``config.json`` (may be empty).
        num_parameters: Sum of element counts of all tensors in the weight files.
        weight_files: Names of the weight files, relative to ``path``.
        weight_bytes: Sum of the weight file sizes in bytes.
        fingerprint: Hex sha256 over ``config.json`` and each weight file's name, size,
            safetensors header and tensor data: all of it for files of up to
            :data:`FINGERPRINT_FULL_HASH_BYTES`, evenly spaced sample blocks for larger
            ones (cheap even for very large checkpoints).
    """

    path: str
    model_type: str
    architectures: tuple[str, ...]
    num_parameters: int
    weight_files: tuple[str, ...]
    weight_bytes: int
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (tuples become lists).

        Returns:
            The fields of this record.
        """
        data = asdict(self)
        data["architectures"] = list(self.architectures)
        data["weight_files"] = list(self.weight_files)
        return data


@dataclass(frozen=True)
class CheckpointFiles:
    """A validated checkpoint directory, before any weight is loaded.

    Attributes:
        root: The checkpoint directory (absolute).
        config: Parsed ``config.json``.
        model_type: ``model_type`` from the config.
        weight_files: Safetensors files the model loads from, sorted by name.
        index: Parsed ``model.safetensors.index.json`` if the checkpoint is sharded.
        tensor_names: Names of all tensors stored in ``weight_files``.
        missing: Tensors the model needs that no weight file holds (empty when the headers were
            not checked against the config: an already-quantized or custom-code checkpoint).
        notes: Sentences for the run's report (e.g. a multi-token-prediction layer not used).
    """

    root: Path
    config: dict[str, Any]
    model_type: str
    weight_files: tuple[Path, ...]
    index: dict[str, Any] | None
    tensor_names: frozenset[str]
    missing: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def bundled_model_path() -> Path:
    """Return the directory of the tiny DeepSeek-V3 checkpoint shipped with dsq.

    Returns:
        Path of ``dsq/assets/tiny_deepseek_v3`` (it may be absent in a source tree
        where the asset has not been generated).
    """
    return Path(__file__).resolve().parent / "assets" / BUNDLED_MODEL_DIR


# --------------------------------------------------------------------------- headers


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
    path = Path(path)
    file_size = _file_size(path)
    header_len, raw = _read_raw_header(path, file_size)
    header = _parse_header_json(path, raw)
    data_end = _check_tensor_entries(path, header)
    expected_size = 8 + header_len + data_end
    if file_size != expected_size:
        problem = "is truncated" if file_size < expected_size else "has trailing bytes"
        raise CheckpointError(
            f"safetensors file {path} {problem}: its header implies {expected_size} bytes "
            f"(8 + {header_len} header + {data_end} data) but the file has {file_size} bytes"
        )
    return header, header_len


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc


def _read_raw_header(path: Path, file_size: int) -> tuple[int, bytes]:
    """Return the header length and the raw header bytes (without the length prefix)."""
    if file_size < 8:
        raise CheckpointError(
            f"safetensors file {path} is {file_size} bytes, too small to hold a header"
        )
    try:
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len == 0 or header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise CheckpointError(
                    f"safetensors file {path} is corrupt: header length {header_len} is "
                    f"impossible for a file of {file_size} bytes"
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


def _tensor_entries(header: Mapping[str, Any]) -> dict[str, Any]:
    return {name: entry for name, entry in header.items() if name != "__metadata__"}


# --------------------------------------------------------------------------- inspection


def inspect_checkpoint(path: str | Path, *, allow_unsupported: bool = False) -> CheckpointFiles:
    """Validate a checkpoint directory without loading any weight.

    The safetensors headers are checked against the model config.json describes (built on the
    ``meta`` device): decoder layer and expert counts, every tensor's shape and dtype, FP8 block
    scales. Tensors the model does not use are tolerated; tensors it needs but the files lack are
    recorded in ``missing`` (:func:`validate_checkpoint` refuses them). Checkpoints of a custom
    ``model_type`` and already-quantized ones (a ``quantization_config`` other than FP8) are checked
    up to their expert tensors only.

    Args:
        path: The checkpoint directory.
        allow_unsupported: Accept a ``model_type`` outside :data:`SUPPORTED_MODEL_TYPES`.

    Returns:
        The validated layout of the checkpoint.

    Raises:
        CheckpointError: The directory, its config or its weights cannot be used, or the
            weights and the config disagree; the message names the offending path, key,
            file or tensor.
    """
    root = _checkpoint_dir(path)
    config = _read_config(root)
    model_type = config["model_type"]
    if not allow_unsupported and model_type not in SUPPORTED_MODEL_TYPES:
        raise _unsupported_model_type(root, model_type, config)
    weight_files, index = _find_weight_files(root)
    headers = {file: read_safetensors_header(file)[0] for file in weight_files}
    if index is not None:
        _check_index_against_headers(root, index, headers)
    tensor_names = frozenset(name for header in headers.values() for name in _tensor_entries(header))
    check_expert_counts(root, config, tensor_names)
    check = _check_against_config(root, config, headers, index)
    return CheckpointFiles(
        root=root,
        config=config,
        model_type=model_type,
        weight_files=weight_files,
        index=index,
        tensor_names=tensor_names,
        missing=check.missing,
        notes=check.notes,
    )


def _check_against_config(
    root: Path, config: Mapping[str, Any], headers: Mapping[Path, Mapping[str, Any]], index: Mapping[str, Any] | None
) -> HeaderCheck:
    """The headers against the model of a supported, unquantized (or FP8) config; nothing otherwise."""
    qc = config.get("quantization_config")
    already_quantized = qc is not None and fp8_format(config) is None
    if config["model_type"] not in SUPPORTED_MODEL_TYPES or already_quantized:
        return HeaderCheck()
    facts = model_facts(config, root / CONFIG_NAME)
    return check_headers_against_config(root, config, stored_tensors(headers, index), facts)


def _checkpoint_dir(path: str | Path) -> Path:
    root = Path(path).expanduser().resolve()
    if root.is_file():
        raise CheckpointError(
            f"checkpoint path {root} is a file; expected a directory holding config.json, "
            "safetensors weights and a tokenizer"
        )
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    return root


def _read_config(root: Path) -> dict[str, Any]:
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint directory {root} has no {CONFIG_NAME}")
    try:
        text = config_path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {config_path}: {exc}") from exc
    try:
        config = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} is not a JSON object")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise CheckpointError(f"{config_path} has no model_type")
    check_config_types(config, config_path)
    return config


def _unsupported_model_type(root: Path, model_type: str, config: Mapping[str, Any]) -> CheckpointError:
    hint = ""
    if "auto_map" in config:
        hint = " (its config declares custom code in auto_map; pass trust_remote_code to load it)"
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    return CheckpointError(
        f"checkpoint {root} has unsupported model_type {model_type!r}{hint}; "
        f"supported model types: {supported}"
    )


def _find_weight_files(root: Path) -> tuple[tuple[Path, ...], dict[str, Any] | None]:
    """Return the weight files (in transformers' order of precedence) and the index."""
    single = root / SAFE_WEIGHTS_NAME
    if single.is_file():
        return (single,), None
    index_path = root / SAFE_WEIGHTS_INDEX_NAME
    if index_path.is_file():
        index = _read_index(index_path)
        return _index_shards(root, index_path, index), index
    present = sorted(entry.name for entry in root.iterdir() if entry.is_file())
    pickles = [name for name in present if name.endswith(PICKLE_SUFFIXES)]
    others = [name for name in present if name.endswith(".safetensors")]
    if pickles and not others:
        raise CheckpointError(
            f"checkpoint {root} only has pickle-based weights ({', '.join(pickles)}); dsq refuses "
            "to load them because unpickling can execute arbitrary code. Convert the checkpoint "
            f"to safetensors ({SAFE_WEIGHTS_NAME} or a sharded {SAFE_WEIGHTS_INDEX_NAME}) first"
        )
    if others:
        raise CheckpointError(
            f"checkpoint {root} has safetensors files ({', '.join(others)}) but neither "
            f"{SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}"
        )
    raise CheckpointError(
        f"checkpoint {root} has no weights: expected {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}"
    )


def _read_index(index_path: Path) -> dict[str, Any]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"shard index {index_path} is not valid JSON: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"shard index {index_path} has no weight_map")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(
                f"shard index {index_path} maps tensor {tensor!r} to {shard!r}, not a file name"
            )
    return index


def _index_shards(root: Path, index_path: Path, index: Mapping[str, Any]) -> tuple[Path, ...]:
    first_tensor: dict[str, str] = {}
    for tensor, shard in index["weight_map"].items():
        first_tensor.setdefault(shard, tensor)
    shards: list[Path] = []
    for shard, tensor in sorted(first_tensor.items()):
        shard_path = root / shard
        if Path(shard).name != shard or shard in (".", "..") or not shard.endswith(".safetensors"):
            raise CheckpointError(
                f"shard index {index_path} names shard {shard!r} (for tensor {tensor!r}), which is "
                f"not a .safetensors file directly inside {root}"
            )
        if not shard_path.is_file():
            raise CheckpointError(
                f"shard index {index_path} names shard {shard!r} (for tensor {tensor!r}), "
                f"but {shard_path} does not exist"
            )
        shards.append(shard_path)
    return tuple(shards)


def _check_index_against_headers(
    root: Path, index: Mapping[str, Any], headers: Mapping[Path, Mapping[str, Any]]
) -> None:
    for tensor, shard in index["weight_map"].items():
        shard_path = root / shard
        if tensor not in headers[shard_path]:
            raise CheckpointError(
                f"shard index {root / SAFE_WEIGHTS_INDEX_NAME} maps tensor {tensor!r} to shard "
                f"{shard!r}, but {shard_path} does not contain it"
            )


# --------------------------------------------------------------------------- identity


def source_info(files: CheckpointFiles) -> SourceInfo:
    """Describe a validated checkpoint for manifests, without loading weights.

    Args:
        files: The result of :func:`inspect_checkpoint`.

    Returns:
        Its identity: path, type, parameter count, weight files and fingerprint.

    Raises:
        CheckpointError: A file changed or vanished since inspection.
    """
    digest = hashlib.sha256()
    config_bytes = _read_bytes(files.root / CONFIG_NAME)
    _hash_field(digest, CONFIG_NAME.encode())
    _hash_field(digest, config_bytes)
    num_parameters = 0
    weight_bytes = 0
    for weight_file in files.weight_files:
        header, header_len = read_safetensors_header(weight_file)
        size = _file_size(weight_file)
        num_parameters += sum(math.prod(entry["shape"]) for entry in _tensor_entries(header).values())
        weight_bytes += size
        _hash_field(digest, weight_file.name.encode())
        _hash_field(digest, str(size).encode())
        _hash_weight_file(digest, weight_file, 8 + header_len, size)
    architectures = files.config.get("architectures") or ()
    return SourceInfo(
        path=str(files.root),
        model_type=files.model_type,
        architectures=tuple(str(name) for name in architectures),
        num_parameters=num_parameters,
        weight_files=tuple(file.name for file in files.weight_files),
        weight_bytes=weight_bytes,
        fingerprint=digest.hexdigest(),
    )


def _hash_field(digest: Any, data: bytes) -> None:
    digest.update(struct.pack("<Q", len(data)))
    digest.update(data)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def _hash_weight_file(digest: Any, path: Path, data_start: int, size: int) -> None:
    """Hash the header bytes and the (full or sampled) tensor data of one file."""
    try:
        with path.open("rb") as handle:
            _hash_field(digest, handle.read(data_start))
            for offset, length in _data_blocks(data_start, size):
                handle.seek(offset)
                _hash_field(digest, handle.read(length))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def _data_blocks(data_start: int, size: int) -> list[tuple[int, int]]:
    """Return ``(offset, length)`` of the data blocks that enter the fingerprint."""
    data_size = size - data_start
    if data_size <= FINGERPRINT_FULL_HASH_BYTES:
        return [(data_start, data_size)]
    last = data_size - FINGERPRINT_BLOCK_BYTES
    step = last / (FINGERPRINT_SAMPLE_BLOCKS - 1)
    return [
        (data_start + round(block * step), FINGERPRINT_BLOCK_BYTES)
        for block in range(FINGERPRINT_SAMPLE_BLOCKS)
    ]


# --------------------------------------------------------------------------- loading


def validate_checkpoint(path: str | Path, *, trust_remote_code: bool = False) -> CheckpointFiles:
    """Check a checkpoint directory without loading any weight: what :func:`inspect_checkpoint`
    checks, and that no tensor the model needs is missing.

    Args:
        path: The checkpoint directory.
        trust_remote_code: Accept a custom ``model_type`` whose config declares ``auto_map``.

    Returns:
        The validated layout of the checkpoint.

    Raises:
        CheckpointError: naming the file, key or tensor at fault.
    """
    root = _checkpoint_dir(path)
    config = _read_config(root)
    files = inspect_checkpoint(root, allow_unsupported=trust_remote_code and "auto_map" in config)
    if files.missing:
        raise CheckpointError(
            f"checkpoint {files.root} is missing {len(files.missing)} tensor(s) the model needs (config.json "
            f"implies them; transformers would initialise them randomly): {name_some(describe_missing(files.missing))}"
        )
    return files


