"""Benchmark data sets: held-out text and multiple-choice items, read from local files.

Files are read by :mod:`dsq.core.textdata` (the ``datasets`` packaged builders, which never
contact the network for local paths, through a throw-away cache directory), so nothing is
written to the user's cache. Multiple-choice items are read line by line, as written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsq.core.errors import DataError
from dsq.core.textdata import check_file, json_lines, read_file, short_repr
from dsq.core.tokens import encode_document

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
            ``text`` field, has a record without a string there, or holds no text.
    """
    records = read_file(Path(path), "benchmark")
    texts = records.texts("text", None, skip_missing=False)
    text = "".join(texts) if records.is_txt else "\n\n".join(texts)
    if not text.strip():
        raise DataError(f"{records.description} contains no text")
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
        raise DataError(f"{where}: field 'context' must be a string, got {short_repr(context)}")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: field 'choices' must be a list of strings, got {short_repr(choices)}")
    if len(choices) < 2:
        raise DataError(f"{where}: field 'choices' needs at least 2 choices, got {len(choices)}")
    if any(not c for c in choices):
        raise DataError(f"{where}: field 'choices' contains an empty choice")
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise DataError(f"{where}: field 'gold' must be an integer index into 'choices', got {short_repr(gold)}")
    if not 0 <= gold < len(choices):
        raise DataError(f"{where}: field 'gold' = {gold} is out of range for {len(choices)} choices")
    return MCItem(context=context, choices=tuple(choices), gold=gold, origin=where.removeprefix("benchmark file "))


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
    path = Path(path)
    description = f"benchmark file {path}"
    check_file(path, description)
    items: list[MCItem] = []
    try:
        for number, row in json_lines(path, description):
            if limit is not None and len(items) >= limit:
                break
            items.append(_mc_item(row, f"{description}, line {number}"))
    except OSError as exc:
        raise DataError(f"cannot read {description}: {exc.strerror or exc}") from None
    if not items:
        raise DataError(f"{description} contains no multiple-choice items")
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
