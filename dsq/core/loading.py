"""Loading a validated checkpoint: the model (in eval mode), its tokenizer, its identity and notes."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dsq.core.checkpoint import (
    TOKENIZER_FILES,
    CheckpointFiles,
    SourceInfo,
    read_config,
    require_loadable,
    source_info,
    validate_checkpoint,
)
from dsq.core.config_checks import name_some
from dsq.core.errors import CheckpointError
from dsq.core.fp8 import fp8_format
from dsq.core.layered import load_model_by_layers
from dsq.core.tokenizer_check import check_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model and tokenizer loaded from a checkpoint directory.

    Attributes:
        model: The causal language model, in eval mode.
        tokenizer: The tokenizer stored alongside the weights.
        source: Identity of the checkpoint it came from.
        notes: Sentences for the run's report about the checkpoint (a tokenizer smaller than
            the vocabulary, tensors the model does not use).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: SourceInfo
    notes: tuple[str, ...] = ()


def load_checkpoint(
    path_or_files: str | Path | CheckpointFiles,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load a local checkpoint: causal LM, tokenizer and identity.

    Only local files are read and only safetensors weights are loaded. A model_type
    outside :data:`SUPPORTED_MODEL_TYPES` is accepted only when ``trust_remote_code``
    is set and the config declares custom code (``auto_map``).

    Args:
        path_or_files: A checkpoint already validated (:func:`dsq.core.checkpoint.validate_checkpoint`:
            its headers are not read again), or the checkpoint directory (validated here).
        dtype: dtype of the loaded parameters.
        trust_remote_code: Allow transformers to run code shipped with the checkpoint.
        device: Device to place the model on.

    Returns:
        The model (in eval mode), its tokenizer, its :class:`SourceInfo` and the notes about
        the checkpoint for the run's report.

    Raises:
        CheckpointError: The checkpoint is invalid, a tensor the model needs is missing
            or has the wrong shape, the tokenizer cannot be loaded or has token ids beyond
            the vocabulary.
    """
    if isinstance(path_or_files, CheckpointFiles):
        files = path_or_files
        require_loadable(files, trust_remote_code=trust_remote_code)
    else:
        files = validate_checkpoint(path_or_files, trust_remote_code=trust_remote_code)
    remote_code = {"trust_remote_code": True} if trust_remote_code else {}
    tokenizer = _load_tokenizer(files.root, remote_code)
    tokenizer_note = check_tokenizer(tokenizer, files.config, files.root)
    notes = files.notes + ((tokenizer_note,) if tokenizer_note is not None else ())
    for note in notes:
        logger.info("checkpoint %s: %s", files.root, note)
    if fp8_format(files.config) is not None:
        # transformers 5.23 on CPU infers the block from the scale grid (rows // scale_rows): it fails on
        # DeepSeek-V3's ragged kv_a_proj_with_mqa (576 rows) and is silently wrong when a ragged size divides.
        # dsq dequantizes by the declared weight_block_size, block by block, and DeepSeek-V4's packed FP4
        # experts (expert_dtype "fp4") group by group, exactly as the layer-by-layer reader streams them.
        model = load_model_by_layers(files, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
    else:
        model = _load_model(files, dtype=dtype, device=device, remote_code=remote_code)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source_info(files), notes=notes)


def load_tokenizer(root: Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of the checkpoint in ``root`` (local files only), checked against its vocab_size.

    Args:
        root: The checkpoint directory.
        trust_remote_code: Allow custom tokenizer code shipped with the checkpoint.

    Returns:
        The tokenizer.

    Raises:
        CheckpointError: It cannot be loaded, or has token ids beyond config.json's vocab_size.
    """
    root = Path(root)
    tokenizer = _load_tokenizer(root, {"trust_remote_code": True} if trust_remote_code else {})
    note = check_tokenizer(tokenizer, read_config(root), root)
    if note is not None:
        logger.info("checkpoint %s: %s", root, note)
    return tokenizer


def _load_tokenizer(root: Path, remote_code: Mapping[str, bool]) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"checkpoint directory {root} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})"
        )
    try:
        return AutoTokenizer.from_pretrained(str(root), local_files_only=True, **remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot load the tokenizer in {root}: {exc}") from exc


def _load_model(
    files: CheckpointFiles,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    remote_code: Mapping[str, bool],
) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(files.root),
            dtype=dtype,
            device_map={"": torch.device(device)},
            local_files_only=True,
            use_safetensors=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **remote_code,
        )
    except torch.cuda.OutOfMemoryError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"transformers cannot load the weights in {files.root}: {exc}") from exc
    _check_loading_info(files.root, info)
    return model


def _check_loading_info(root: Path, info: Mapping[str, Any]) -> None:
    """Raise on missing or mismatched tensors; log unexpected ones."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise CheckpointError(
            f"checkpoint {root} is missing {len(missing)} tensor(s) the model needs "
            f"(transformers would initialise them randomly): {name_some(missing)}"
        )
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda item: str(item[0]))
    if mismatched:
        described = [
            f"{key} (file {tuple(found)}, model {tuple(wanted)})" for key, found, wanted in mismatched
        ]
        raise CheckpointError(
            f"checkpoint {root} has {len(mismatched)} tensor(s) whose shape does not match the "
            f"model: {name_some(described)}"
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        logger.warning(
            "checkpoint %s has %d tensor(s) the model does not use: %s",
            root,
            len(unexpected),
            name_some(unexpected),
        )
