"""Loading local Hugging Face checkpoints safely.

A checkpoint is a directory with ``config.json``, safetensors weights (one
``model.safetensors`` or shards listed in ``model.safetensors.index.json``) and a
tokenizer. Everything is validated before any weight is read: the directory layout,
the config and its field types, every safetensors header (offsets, sizes, dtypes), the
shard index, and the headers against the model the config describes (decoder layer and
expert counts, every tensor's shape and dtype; see :mod:`dsq.core.config_checks` and :mod:`dsq.core.header_checks`). Pickle-based
weights are refused outright and never unpickled. Loading is local only; the hub is
never contacted.

Each weight file's header is read once, by :func:`inspect_checkpoint`, and carried in the
:class:`CheckpointFiles` it returns: the streaming decision, the shard reader, the identity
(:func:`source_info`) and :func:`dsq.core.loading.load_checkpoint` take the headers from there.

Tensors the model needs but the files lack are errors (:func:`validate_checkpoint`):
transformers would otherwise initialise them randomly. A tokenizer with more tokens than
``vocab_size`` is an error too; one with fewer is a note.
"""
from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dsq.core.config_checks import check_config_types, model_facts, name_some
from dsq.core.errors import CheckpointError
from dsq.core.fp8 import fp8_format
from dsq.core.header_checks import (
    HeaderCheck,
    check_expert_counts,
    check_headers_against_config,
    describe_missing,
)
from dsq.core.layout import SUPPORTED_MODEL_TYPES
from dsq.core.safetensors_header import (
    SAFETENSORS_DTYPE_BITS,  # noqa: F401 (re-exported)
    SafetensorsHeader,
    StoredTensor,
    file_size,
    read_header,
    read_safetensors_header,  # noqa: F401 (re-exported)
    stored_tensors,
)

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

FINGERPRINT_FULL_HASH_BYTES = 64 * 2**20
"""Weight files whose data section is at most this large are fingerprinted byte for byte."""

FINGERPRINT_SAMPLE_BLOCKS = 16
"""Number of evenly spaced data blocks (first and last included) hashed for larger files."""

FINGERPRINT_BLOCK_BYTES = 64 * 2**10
"""Size of each sampled data block."""

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
        headers: The validated safetensors header of each weight file, in ``weight_files`` order.
        tensors: Every tensor by name: its file, dtype, shape and data offsets (a tensor the
            shard index names counts in the shard it names).
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
    headers: tuple[SafetensorsHeader, ...]
    tensors: Mapping[str, StoredTensor]
    missing: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def bundled_model_path() -> Path:
    """Return the directory of the tiny DeepSeek-V3 checkpoint shipped with dsq.

    Returns:
        Path of ``dsq/assets/tiny_deepseek_v3`` (it may be absent in a source tree
        where the asset has not been generated).
    """
    return Path(__file__).resolve().parents[1] / "assets" / BUNDLED_MODEL_DIR


# --------------------------------------------------------------------------- inspection


def inspect_checkpoint(path: str | Path, *, allow_unsupported: bool = False) -> CheckpointFiles:
    """Validate a checkpoint directory without loading any weight.

    The safetensors headers are checked against the model config.json describes (built on the
    ``meta`` device): decoder layer and expert counts, every tensor's shape and dtype, FP8 block
    scales. Tensors the model does not use are tolerated; tensors it needs but the files lack are
    recorded in ``missing`` (:func:`validate_checkpoint` refuses them). Checkpoints of a custom
    ``model_type`` and already-quantized ones (a ``quantization_config`` other than FP8) are checked
    up to their expert tensors only. Each weight file's header is read here, once, and carried in
    the result.

    Args:
        path: The checkpoint directory.
        allow_unsupported: Accept a ``model_type`` outside :data:`SUPPORTED_MODEL_TYPES`.

    Returns:
        The validated layout of the checkpoint, with its parsed headers.

    Raises:
        CheckpointError: The directory, its config or its weights cannot be used, or the
            weights and the config disagree; the message names the offending path, key,
            file or tensor.
    """
    root = checkpoint_dir(path)
    return _inspect(root, read_config(root), allow_unsupported=allow_unsupported)


def _inspect(root: Path, config: dict[str, Any], *, allow_unsupported: bool) -> CheckpointFiles:
    model_type = config["model_type"]
    if not allow_unsupported and model_type not in SUPPORTED_MODEL_TYPES:
        raise _unsupported_model_type(root, model_type, config)
    weight_files, index = _find_weight_files(root)
    headers = tuple(read_header(file) for file in weight_files)
    if index is not None:
        _check_index_against_headers(root, index, headers)
    tensor_names = frozenset(name for header in headers for name in header.tensors)
    check_expert_counts(root, config, tensor_names)
    tensors = MappingProxyType(stored_tensors(headers, index))
    check = _check_against_config(root, config, tensors)
    return CheckpointFiles(
        root=root,
        config=config,
        model_type=model_type,
        weight_files=weight_files,
        index=index,
        tensor_names=tensor_names,
        headers=headers,
        tensors=tensors,
        missing=check.missing,
        notes=check.notes,
    )


def _check_against_config(root: Path, config: Mapping[str, Any], tensors: Mapping[str, StoredTensor]) -> HeaderCheck:
    """The headers against the model of a supported, unquantized (or FP8) config; nothing otherwise."""
    qc = config.get("quantization_config")
    already_quantized = qc is not None and fp8_format(config) is None
    if config["model_type"] not in SUPPORTED_MODEL_TYPES or already_quantized:
        return HeaderCheck()
    facts = model_facts(config, root / CONFIG_NAME)
    return check_headers_against_config(root, config, tensors, facts)


def checkpoint_dir(path: str | Path) -> Path:
    """``path`` as an absolute checkpoint directory; a file or a missing path is a :class:`CheckpointError`."""
    root = Path(path).expanduser().resolve()
    if root.is_file():
        raise CheckpointError(
            f"checkpoint path {root} is a file; expected a directory holding config.json, "
            "safetensors weights and a tokenizer"
        )
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    return root


def read_config(root: Path) -> dict[str, Any]:
    """The checkpoint's config.json, parsed and type-checked (it must name a ``model_type``)."""
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


def _check_index_against_headers(root: Path, index: Mapping[str, Any], headers: tuple[SafetensorsHeader, ...]) -> None:
    by_path = {header.path: header for header in headers}
    for tensor, shard in index["weight_map"].items():
        shard_path = root / shard
        if tensor not in by_path[shard_path].tensors:
            raise CheckpointError(
                f"shard index {root / SAFE_WEIGHTS_INDEX_NAME} maps tensor {tensor!r} to shard "
                f"{shard!r}, but {shard_path} does not contain it"
            )


# --------------------------------------------------------------------------- identity


def source_info(files: CheckpointFiles) -> SourceInfo:
    """Describe a validated checkpoint for manifests, without loading weights.

    The headers are those :func:`inspect_checkpoint` read; each file's bytes are hashed from disk.

    Args:
        files: The result of :func:`inspect_checkpoint`.

    Returns:
        Its identity: path, type, parameter count, weight files and fingerprint.

    Raises:
        CheckpointError: A file vanished or changed size since inspection.
    """
    digest = hashlib.sha256()
    config_bytes = _read_bytes(files.root / CONFIG_NAME)
    _hash_field(digest, CONFIG_NAME.encode())
    _hash_field(digest, config_bytes)
    for header in files.headers:
        size = file_size(header.path)
        if size != header.size:
            raise CheckpointError(
                f"safetensors file {header.path} changed since the checkpoint was inspected: "
                f"it had {header.size} bytes, it has {size}"
            )
        _hash_field(digest, header.path.name.encode())
        _hash_field(digest, str(size).encode())
        _hash_weight_file(digest, header.path, header.data_start, size)
    architectures = files.config.get("architectures") or ()
    return SourceInfo(
        path=str(files.root),
        model_type=files.model_type,
        architectures=tuple(str(name) for name in architectures),
        num_parameters=sum(tensor.numel for header in files.headers for tensor in header.tensors.values()),
        weight_files=tuple(file.name for file in files.weight_files),
        weight_bytes=sum(header.size for header in files.headers),
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
        The validated layout of the checkpoint, with its parsed headers.

    Raises:
        CheckpointError: naming the file, key or tensor at fault.
    """
    root = checkpoint_dir(path)
    config = read_config(root)
    files = _inspect(root, config, allow_unsupported=trust_remote_code and "auto_map" in config)
    require_loadable(files, trust_remote_code=trust_remote_code)
    return files


def require_loadable(files: CheckpointFiles, *, trust_remote_code: bool = False) -> None:
    """Check an inspected checkpoint the way :func:`validate_checkpoint` does (no file is read).

    Args:
        files: The result of :func:`inspect_checkpoint` or :func:`validate_checkpoint`.
        trust_remote_code: Accept a custom ``model_type`` whose config declares ``auto_map``.

    Raises:
        CheckpointError: The ``model_type`` is not supported (and not custom code allowed by
            ``trust_remote_code``), or tensors the model needs are missing (named).
    """
    allowed = trust_remote_code and "auto_map" in files.config
    if files.model_type not in SUPPORTED_MODEL_TYPES and not allowed:
        raise _unsupported_model_type(files.root, files.model_type, files.config)
    if files.missing:
        raise CheckpointError(
            f"checkpoint {files.root} is missing {len(files.missing)} tensor(s) the model needs (config.json "
            f"implies them; transformers would initialise them randomly): {name_some(describe_missing(files.missing))}"
        )
