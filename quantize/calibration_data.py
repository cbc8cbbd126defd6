"""Calibration data for post-training quantization: token windows drawn from a text corpus.

Sources, in order of precedence: a local ``path`` (``.txt``, ``.jsonl``/``.json``,
``.parquet`` or a directory written by ``datasets``' ``save_to_disk``, read by
:mod:`dsq.core.textdata`), else a Hub ``dataset`` name, else the bundled ``calibration.txt``.
Local files never reach the user's cache and an edited file always gives fresh data. Chat
records are rendered by :mod:`dsq.core.chat`. Nothing is unpickled and no remote code is run.

Each document is encoded as ``tokenizer(document)["input_ids"]`` (the tokenizer's own
special tokens: a leading BOS where it adds one, a trailing EOS where it appends one; see
:mod:`dsq.core.tokens`); consecutive documents are joined with the tokenizer's EOS id (when it
has one) unless the first already ends with it, into one stream, and ``samples``
non-overlapping ``seq_len`` windows are drawn from it with a generator seeded by ``seed``:
the same spec and tokenizer always give the same tensor.

Example:
    >>> spec = CalibrationDataSpec(path="calib.jsonl", samples=64, seq_len=256)
    >>> ids = load_calibration(spec, tokenizer)  # (64, 256) int64
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch

from dsq.assets import data_file
from dsq.core.chat import chats, render_chat
from dsq.core.errors import DataError
from dsq.core.textdata import (
    SUPPORTED_SUFFIXES,
    Records,
    quiet_progress,
    read_file,
    read_records,
)
from dsq.core.tokens import encode_texts, special_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

@dataclass(frozen=True)
class CalibrationDataSpec:
    """Where calibration text comes from and how many token windows to draw.

    Args:
        path: Local file (``.txt``, ``.jsonl``/``.json``, ``.parquet``) or a directory
            written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``. A ``.txt`` file
            is one document (``text_field`` does not apply). Takes precedence over ``dataset``.
        dataset: Hugging Face Hub dataset name, used only when ``path`` is None.
        split: Split to read from a ``DatasetDict`` directory or from the Hub.
        text_field: Column holding the text of each record.
        messages_field: If set, column holding chat messages (a list of
            ``{"role", "content"}``) rendered with the tokenizer's chat template;
            ``text_field`` is then ignored.
        samples: Number of sequences to draw (>= 1).
        seq_len: Tokens per sequence (>= 2).
        seed: Seed of the window choice.

    Raises:
        ValueError: A field has an invalid type or value.
    """

    path: str | None = None
    dataset: str | None = None
    split: str = "train"
    text_field: str = "text"
    messages_field: str | None = None
    samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        for name in ("path", "dataset", "messages_field"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be None or a non-empty string, got {value!r}")
        for name in ("split", "text_field"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        for name, low in (("samples", 1), ("seq_len", 2), ("seed", None)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if low is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")


@dataclass(frozen=True)
class CalibrationSummary:
    """What a calibration set was drawn from, for the run report.

    Attributes:
        source: Resolved file or directory path, or ``hub:NAME``.
        source_kind: ``"file"``, ``"directory"``, ``"hub"`` or ``"bundled"``.
        field: Column read (``text`` for ``.txt``; the messages column for chat data).
        chat_template: Whether records were rendered with the chat template.
        documents: Non-empty documents tokenized.
        tokens: Tokens in the joined stream (EOS separators included).
        windows_available: Non-overlapping ``seq_len`` windows the stream holds.
        samples: Windows drawn.
        seq_len: Tokens per window.
        seed: Seed of the window choice.
    """

    source: str
    source_kind: str
    field: str
    chat_template: bool
    documents: int
    tokens: int
    windows_available: int
    samples: int
    seq_len: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as a JSON-ready dict."""
        return asdict(self)


def load_calibration(spec: CalibrationDataSpec, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Load calibration token windows.

    Args:
        spec: Data source and window count/length.
        tokenizer: Hugging Face tokenizer of the model being quantized.

    Returns:
        ``torch.int64`` tensor of token ids, shape ``(spec.samples, spec.seq_len)``;
        deterministic for a given spec, data and tokenizer.

    Raises:
        DataError: The source is missing, unreadable, lacks the field, is empty or too
            short (the message names the source and what to change).
    """
    ids, _ = load_calibration_with_summary(spec, tokenizer)
    return ids


def load_calibration_with_summary(
    spec: CalibrationDataSpec, tokenizer: PreTrainedTokenizerBase
) -> tuple[torch.Tensor, CalibrationSummary]:
    """Load calibration token windows and describe where they came from.

    Args:
        spec: Data source and window count/length.
        tokenizer: Hugging Face tokenizer of the model being quantized.

    Returns:
        ``(ids, summary)``: ids as in :func:`load_calibration`, and a
        :class:`CalibrationSummary` (``summary.to_dict()`` for a report).

    Raises:
        DataError: As :func:`load_calibration`.
    """
    src = _load_source(spec)
    records = src.records
    if spec.messages_field is not None:
        field = spec.messages_field
        texts = _render_chats(records, field, tokenizer)
    else:
        field = "text" if records.is_txt else spec.text_field
        texts = [text for text in records.texts(field, "text_field", skip_missing=True) if text]
    stream, documents = _token_stream(texts, tokenizer)  # (tokens,)
    if documents == 0:
        raise DataError(f"{records.description} holds no text in field {field!r} (0 documents, 0 tokens)")
    windows = stream.numel() // spec.seq_len
    _check_enough(stream.numel(), windows, spec, records.description)
    ids = _draw_windows(stream, spec)  # (samples, seq_len)
    summary = CalibrationSummary(
        source=src.resolved,
        source_kind=src.kind,
        field=field,
        chat_template=spec.messages_field is not None,
        documents=documents,
        tokens=int(stream.numel()),
        windows_available=windows,
        samples=spec.samples,
        seq_len=spec.seq_len,
        seed=spec.seed,
    )
    return ids, summary


@dataclass(frozen=True)
class _Source:
    """A resolved, loaded source: its records, what it resolved to and its kind."""

    records: Records  # described as "calibration file PATH", "calibration dataset 'NAME' (split 'S')", ...
    resolved: str  # the path, or hub:NAME
    kind: str  # file | directory | hub | bundled


def _load_source(spec: CalibrationDataSpec) -> _Source:
    """Resolve the source of ``spec`` (path, else dataset, else bundled file) and read it."""
    if spec.path is not None:
        path = Path(spec.path).expanduser().resolve()
        kind = "directory" if path.is_dir() else "file"
        return _Source(read_records(path, "calibration", spec.split), str(path), kind)
    if spec.dataset is not None:
        description = f"calibration dataset {spec.dataset!r} (split {spec.split!r})"
        records = Records(_load_hub(spec.dataset, spec.split), None, description)
        return _Source(records, f"hub:{spec.dataset}", "hub")
    path = data_file("calibration.txt")
    return _Source(read_file(path, "calibration"), str(path), "bundled")


def _load_hub(name: str, split: str) -> datasets.Dataset:
    """Load a Hub dataset split (downloads go to the standard ``datasets`` cache)."""
    try:
        with quiet_progress():
            loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline: ConnectionError; unknown name or split: others
        raise DataError(
            f"calibration dataset {name!r} (split {split!r}) could not be loaded from the Hugging Face "
            f"Hub: {exc}. The machine may be offline: download the data and set path to a local file "
            f"({', '.join(SUPPORTED_SUFFIXES)}) or a save_to_disk directory instead."
        ) from exc
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"calibration dataset {name!r} (split {split!r}) did not load as one table")
    return loaded


def _render_chats(records: Records, field: str, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Render each record's messages with the tokenizer's chat template (as text); ``None`` rows are skipped."""
    texts: list[str] = []
    remedy = "use text_field with plain text or a tokenizer that has one"
    for where, messages in chats(records, field, "messages_field", tokenizer, remedy):
        text = render_chat(tokenizer, messages, where)
        if text:
            texts.append(text)
    return texts


def _token_stream(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, int]:
    """Encode documents as the tokenizer does (its own special tokens) and join them with EOS.

    Returns:
        ``(stream, documents)``: 1-D int64 ids and the number of documents that gave tokens.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    added = special_tokens(tokenizer)
    pieces: list[torch.Tensor] = []
    documents = 0
    previous: list[int] = []
    for ids in encode_texts(tokenizer, texts):
        if not ids:
            continue
        ids = [*added.prefix, *ids, *added.suffix]
        if documents and eos is not None and previous[-1] != int(eos):
            pieces.append(torch.tensor([int(eos)], dtype=torch.long))
        pieces.append(torch.tensor(ids, dtype=torch.long))
        previous = ids
        documents += 1
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    return stream, documents  # (tokens,)


def _check_enough(tokens: int, windows: int, spec: CalibrationDataSpec, source: str) -> None:
    if windows >= spec.samples:
        return
    max_seq_len = tokens // spec.samples
    lower_seq = (
        f"seq_len to at most {max_seq_len}" if max_seq_len >= 2 else "seq_len (too few tokens even at 2)"
    )
    raise DataError(
        f"{source} is too short: {tokens} tokens give {windows} non-overlapping windows of "
        f"seq_len {spec.seq_len}, but samples = {spec.samples}. Lower samples to at most {windows} or "
        f"{lower_seq}, or provide more text."
    )


def _draw_windows(stream: torch.Tensor, spec: CalibrationDataSpec) -> torch.Tensor:
    """Draw ``spec.samples`` distinct aligned windows, shifted by one random offset.

    The windows sit on a grid of stride ``seq_len`` starting at a random offset within
    the stream's slack (``tokens % seq_len``), so they never overlap and every token can
    be reached across seeds.
    """
    generator = torch.Generator().manual_seed(spec.seed)
    windows = stream.numel() // spec.seq_len
    slack = stream.numel() - windows * spec.seq_len
    offset = int(torch.randint(0, slack + 1, (1,), generator=generator))
    chosen = torch.randperm(windows, generator=generator)[: spec.samples]  # (samples,)
    starts = offset + chosen * spec.seq_len
    index = starts[:, None] + torch.arange(spec.seq_len)  # (samples, seq_len)
    return stream[index].to(torch.int64)
