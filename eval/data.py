"""Benchmark data sets: held-out text and multiple-choice items, read from local files.

Files are read with the ``datasets`` packaged builders (``text``, ``json``, ``parquet``),
which never contact the network for local paths. Each load uses a throw-away cache
directory and keeps the table in memory, so nothing is written to the user's cache.
"""
from __future__ import annotations

import tempfile
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch

from dsq.core.errors import DataError
from dsq.core.tokens import encode_document

_TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
_MC_FIELDS = ("context", "choices", "gold")


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question.

    Attributes:
        context: Text the choices continue (the question or sentence prefix).
        choices: Candidate continuations, at least two, in file order.
        gold: Index of the correct choice in ``choices``.
        origin: Where the item was read (``"mc.jsonl, line 7"``), for messages; not part of
            equality, so the same question read from two files is the same item.
    """

    context: str
    choices: tuple[str, ...]
    gold: int
    origin: str | None = field(default=None, compare=False)


def _require_file(path: Path) -> Path:
    """Return ``path`` as a Path if it is a non-empty file, else raise ``DataError``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"benchmark file {path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise DataError(f"benchmark file {path} is empty")
    return path


def _load_table(builder: str, path: Path, **kwargs: Any) -> datasets.Dataset:
    """Load one local file with a packaged ``datasets`` builder, offline and uncached.

    Args:
        builder: Packaged builder name: ``"text"``, ``"json"`` or ``"parquet"``.
        path: Local file to read.
        **kwargs: Extra builder options (e.g. ``sample_by``).

    Returns:
        The ``train`` split, held in memory.

    Raises:
        DataError: The file cannot be parsed by the builder.
    """
    progress_was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="dsq-eval-data-") as cache_dir:
            return datasets.load_dataset(
                builder,
                data_files=str(path),
                split="train",
                cache_dir=cache_dir,
                keep_in_memory=True,
                **kwargs,
            )
    except Exception as exc:  # the builders raise many unrelated types for bad files
        raise DataError(f"cannot read benchmark file {path} as {builder}: {exc}") from exc
    finally:
        if progress_was_enabled:
            datasets.enable_progress_bars()


def _text_column(table: datasets.Dataset, path: Path) -> list[str]:
    """Return the ``text`` column of ``table``, checking that every row holds a string."""
    if "text" not in table.column_names:
        raise DataError(f"benchmark file {path} has no 'text' field (fields: {table.column_names})")
    texts = table["text"]
    for row, value in enumerate(texts):
        if not isinstance(value, str):
            raise DataError(f"benchmark file {path}, row {row}: field 'text' must be a string, got {value!r}")
    return list(texts)


def load_text(path: Path | str) -> str:
    """Load a held-out text corpus for perplexity and fidelity.

    ``.txt`` files are read whole (one document). ``.jsonl``/``.json`` and ``.parquet``
    files must have a ``text`` field; their records are joined with blank lines
    (``"\\n\\n"``) in file order.

    Args:
        path: Local ``.txt``, ``.jsonl``, ``.json`` or ``.parquet`` file.

    Returns:
        The corpus as one string.

    Raises:
        DataError: The file is missing, empty, has an unsupported suffix, lacks a
            ``text`` field, or holds no text.
    """
    path = _require_file(Path(path))
    suffix = path.suffix.lower()
    if suffix == ".txt":
        table = _load_table("text", path, sample_by="document")
        text = "".join(_text_column(table, path))
    elif suffix in (".jsonl", ".json"):
        text = "\n\n".join(_text_column(_load_table("json", path), path))
    elif suffix == ".parquet":
        text = "\n\n".join(_text_column(_load_table("parquet", path), path))
    else:
        raise DataError(f"benchmark file {path}: unsupported suffix {suffix!r}, expected one of {_TEXT_SUFFIXES}")
    if not text.strip():
        raise DataError(f"benchmark file {path} contains no text")
    return text


def _mc_item(row: Any, where: str) -> MCItem:
    """Validate one JSONL record and turn it into an :class:`MCItem`.

    Args:
        row: The parsed JSON value of one line.
        where: ``"benchmark file PATH, line N"``, for messages and the item's ``origin``.

    Returns:
        The validated item.

    Raises:
        DataError: Naming file, line and field.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: each line must be a JSON object {{context, choices, gold}}, got {type(row).__name__}")
    for name in _MC_FIELDS:
        if row.get(name) is None:
            raise DataError(f"{where}: missing field {name!r}")
    context, choices, gold = row["context"], row["choices"], row["gold"]
    if not isinstance(context, str):
        raise DataError(f"{where}: field 'context' must be a string, got {_short(context)}")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: field 'choices' must be a list of strings, got {_short(choices)}")
    if len(choices) < 2:
        raise DataError(f"{where}: field 'choices' needs at least 2 choices, got {len(choices)}")
    if any(not c for c in choices):
        raise DataError(f"{where}: field 'choices' contains an empty choice")
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise DataError(f"{where}: field 'gold' must be an integer index into 'choices', got {_short(gold)}")
    if not 0 <= gold < len(choices):
        raise DataError(f"{where}: field 'gold' = {gold} is out of range for {len(choices)} choices")
    return MCItem(context=context, choices=tuple(choices), gold=gold, origin=where.removeprefix("benchmark file "))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _jsonl_records(path: Path):
    """``(line number, parsed value)`` for every non-blank line of a UTF-8 JSONL file.

    Raises:
        DataError: A line that is not UTF-8 or not JSON, naming the file and the line.
    """
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"benchmark file {path}, line {number}: not UTF-8 text") from None
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except (json.JSONDecodeError, RecursionError) as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                raise DataError(f"benchmark file {path}, line {number}: not a JSON object ({reason})") from None


def load_multiple_choice(path: Path | str, limit: int | None = None) -> list[MCItem]:
    """Load multiple-choice items from a JSONL file.

    Each non-blank line is ``{"context": str, "choices": [str, ...], "gold": int}`` (other fields
    are ignored). Choices are appended to the context verbatim, so the separator (usually a
    leading space on each choice) belongs in the data. Values are taken as written: ``"gold": "0"``
    or ``1.0`` is an error, not an index.

    Args:
        path: Local ``.jsonl`` file.
        limit: Keep only the first ``limit`` items (``None`` keeps all); lines after them are not read.

    Returns:
        The items in file order, each with its ``origin`` (file and line).

    Raises:
        DataError: The file is missing, empty or unreadable, or a line is invalid (the message
            names the file, the 1-based line number and the field).
    """
    if limit is not None and limit <= 0:
        raise DataError(f"multiple-choice limit must be positive, got {limit}")
    path = _require_file(Path(path))
    items: list[MCItem] = []
    try:
        for number, row in _jsonl_records(path):
            if limit is not None and len(items) >= limit:
                break
            items.append(_mc_item(row, f"benchmark file {path}, line {number}"))
    except OSError as exc:
        raise DataError(f"cannot read benchmark file {path}: {exc.strerror or exc}") from None
    if not items:
        raise DataError(f"benchmark file {path} contains no multiple-choice items")
    return items


def tokenize_text(
    tokenizer: Any,
    text: str,
    max_tokens: int | None = None,
    *,
    add_bos: bool = True,
) -> torch.Tensor:
    """Tokenize a corpus into one flat id sequence.

    The ids are ``tokenizer(text)["input_ids"]``: the special tokens the tokenizer itself
    adds (a leading BOS for Llama tokenizers, none for GPT-2 style ones; see
    :mod:`dsq.core.tokens`), never a second BOS, and a trailing EOS where the tokenizer appends one.

    Args:
        tokenizer: A Hugging Face tokenizer.
        text: The corpus.
        max_tokens: Keep only the first ``max_tokens`` ids (BOS included).
        add_bos: Keep the ids the tokenizer puts before the text (its BOS, if it adds one).

    Returns:
        1-D ``torch.long`` tensor of token ids.  # (tokens,)

    Raises:
        DataError: ``max_tokens`` is not positive or the text yields no tokens.
    """
    if max_tokens is not None and max_tokens <= 0:
        raise DataError(f"max_tokens must be positive, got {max_tokens}")
    ids = encode_document(tokenizer, text, with_prefix=add_bos)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if not ids:
        raise DataError("benchmark text produced no tokens")
    return torch.tensor(ids, dtype=torch.long)  # (tokens,)
