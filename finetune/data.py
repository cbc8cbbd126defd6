"""Training data for fine-tuning: plain text or instruction data cut into token blocks.

Sources are local files (``.txt``, ``.jsonl``/``.json``, ``.parquet``) or directories written
by ``datasets``' ``save_to_disk``, read by :mod:`dsq.core.textdata` (nothing is written to the
user's cache; an edited file is always re-read). A table has one document per row; a ``.txt``
file is cut into documents at form feeds, or else at blank lines into groups of at least
2,000 characters (:func:`split_documents`).

Two formats, chosen by the type of ``TrainDataSpec.fields`` (see :mod:`dsq.finetune.examples`):
:class:`TextFields` (plain text, every token scored: ``labels == input_ids``) and
:class:`InstructionFields` (prompt tokens get label ``-100``; a ``messages`` column, or a
prompt/response pair when the tokenizer has a chat template, is rendered with the tokenizer's
chat template and only the assistant turns are scored).

Documents (or examples) are split into train and validation *before* packing, so no
validation text reaches a training block. Packing concatenates the examples of a split and
cuts ``seq_len`` blocks (every position attends, across document borders; the ragged tail
is dropped and counted); ``pack=False`` gives one right-padded block per example
(:mod:`dsq.finetune.packing`). Blocks without a single scored token are dropped (they carry
no loss). The same spec and tokenizer always give the same tensors.

Example:
    >>> spec = TrainDataSpec(train="domain_train.txt", validation="domain_heldout.txt", seq_len=256)
    >>> data = load_training_data(spec, tokenizer)
    >>> data.train.input_ids.shape  # (blocks, 256)
    >>> data.summary.to_dict()["train"]["blocks"]
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dsq.core.errors import DataError
from dsq.core.textdata import Records, read_records

from .examples import (
    ExampleLayout,
    InstructionFields,
    TextFields,
    chat_examples,
    check_name,
    example_layout,
    prompt_response_examples,
    text_example,
)
from .packing import (
    BlockLayout,
    Example,
    SplitSummary,
    TokenBlocks,
    build_split,
    empty_split,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TXT_MIN_DOCUMENT_CHARS = 2000
"""Without form feeds, a ``.txt`` file is cut at blank lines into documents of at least this many characters."""

_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")  # one or more blank (or whitespace-only) lines


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class TrainDataSpec:
    """Where fine-tuning data comes from and how it is cut into blocks.

    Args:
        train: ``.txt``, ``.jsonl``/``.json``, ``.parquet`` file or a ``save_to_disk``
            directory (``Dataset`` or ``DatasetDict``).
        validation: Same kinds of source; None holds out ``val_fraction`` of the train
            documents instead (``val_fraction`` is ignored when this is set).
        split: Split read from a ``DatasetDict`` directory given as ``train``.
        validation_split: Split read from a ``DatasetDict`` directory given as ``validation``.
        fields: :class:`TextFields` or :class:`InstructionFields`.
        seq_len: Tokens per block (>= 2).
        val_fraction: Share of train documents held out, in ``[0, 1)``; above 0 at least
            one document is held out.
        seed: Seed of the held-out document choice.
        pack: Pack examples into full ``seq_len`` blocks; False gives one right-padded
            (and, if longer, truncated) block per example.

    Raises:
        ValueError: A field has an invalid type or value.
    """

    train: str | Path
    validation: str | Path | None = None
    split: str = "train"
    validation_split: str = "validation"
    fields: TextFields | InstructionFields = TextFields()
    seq_len: int = 256
    val_fraction: float = 0.1
    seed: int = 0
    pack: bool = True

    def __post_init__(self) -> None:
        for name in ("train", "validation"):
            value = getattr(self, name)
            if value is None and name == "validation":
                continue
            value = os.fspath(value) if isinstance(value, os.PathLike) else value
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty path, got {value!r}")
            object.__setattr__(self, name, value)  # stored as str
        check_name("split", self.split)
        check_name("validation_split", self.validation_split)
        if not isinstance(self.fields, (TextFields, InstructionFields)):
            raise ValueError(f"fields must be TextFields or InstructionFields, got {self.fields!r}")
        for name, low in (("seq_len", 2), ("seed", None)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if low is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        fraction = self.val_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise ValueError(f"val_fraction must be a number in [0, 1), got {fraction!r}")
        if not isinstance(self.pack, bool):
            raise ValueError(f"pack must be True or False, got {self.pack!r}")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class DataSummary:
    """What the training data was built from, for the run report.

    Attributes:
        train: Summary of the training split.
        validation: Summary of the validation split.
        validation_from: ``"file"`` (``spec.validation``), ``"held_out"`` (``val_fraction``
            of the train documents) or ``"none"`` (``val_fraction`` 0).
        format: ``"text"``, ``"prompt_response"`` or ``"messages"``.
        fields: Columns read (``()`` for a ``.txt`` file).
        chat_template: Whether examples were rendered with the tokenizer's chat template.
        seq_len: Tokens per block.
        pack: Whether examples were packed.
        val_fraction: Share held out (None when a validation source was given).
        seed: Seed of the held-out choice.
    """

    train: SplitSummary
    validation: SplitSummary
    validation_from: str
    format: str
    fields: tuple[str, ...]
    chat_template: bool
    seq_len: int
    pack: bool
    val_fraction: float | None
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as a JSON-ready dict."""
        result = asdict(self)
        result["fields"] = list(self.fields)
        return result


@dataclass(frozen=True)
class TrainingData:
    """Training and validation blocks plus a summary for the report."""

    train: TokenBlocks
    validation: TokenBlocks
    summary: DataSummary




# --------------------------------------------------------------------------- entry point


def load_training_data(spec: TrainDataSpec, tokenizer: PreTrainedTokenizerBase) -> TrainingData:
    """Read, split, tokenize and block the fine-tuning data of ``spec``.

    Args:
        spec: Sources, fields and block layout.
        tokenizer: Hugging Face tokenizer of the model being fine-tuned.

    Returns:
        Train and validation :class:`TokenBlocks` and a :class:`DataSummary`;
        deterministic for a given spec, data and tokenizer.

    Raises:
        DataError: A source is missing, unreadable, of an unsupported kind, empty or lacks
            a column; a record is malformed (the message names its line or row); the data
            gives no scored token or too few tokens for one block; the validation set is empty.
    """
    layout = example_layout(spec.fields, tokenizer)
    train_records = _read(spec.train, "train", spec.split)
    train, validation = _parts(spec, layout, tokenizer, train_records)
    train_blocks, train_summary = _build(train, tokenizer, spec)
    if train_summary.scored_tokens == 0:
        raise DataError(f"{train.where} gives no scored tokens (every label is -100); {layout.hint}")
    if validation is None:
        val_blocks, val_summary = empty_split(spec.seq_len)
    else:
        val_blocks, val_summary = _build(validation, tokenizer, spec)
        if len(val_blocks) == 0:
            raise DataError(f"validation set is empty: {validation.where} gives no block with a scored token")
    summary = DataSummary(
        train=train_summary,
        validation=val_summary,
        validation_from="none" if validation is None else validation.origin,
        format=layout.format,
        fields=() if train_records.is_txt else layout.fields,
        chat_template=layout.chat_template,
        seq_len=spec.seq_len,
        pack=spec.pack,
        val_fraction=None if spec.validation is not None else float(spec.val_fraction),
        seed=spec.seed,
    )
    return TrainingData(train=train_blocks, validation=val_blocks, summary=summary)


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class _Part:
    """The examples of one split and how to name it in messages."""

    examples: list[Example]
    where: str  # e.g. "train file PATH"
    source: str  # resolved path
    origin: str  # train | file | held_out
    remedy: str  # what to change when it is too short


def _parts(
    spec: TrainDataSpec, layout: ExampleLayout, tokenizer: PreTrainedTokenizerBase, train_records: Records
) -> tuple[_Part, _Part | None]:
    """Return the train part and the validation part (None when nothing is held out)."""
    examples = _examples(train_records, spec.fields, layout, tokenizer)
    source = str(train_records.path)
    if spec.validation is not None:
        val_records = _read(spec.validation, "validation", spec.validation_split)
        val_examples = _examples(val_records, spec.fields, layout, tokenizer)
        validation = _Part(val_examples, val_records.description, str(val_records.path), "file", "add data")
    else:
        examples, held = _hold_out(examples, spec, train_records.description)
        where = f"validation documents held out of {train_records.description}"
        remedy = "raise val_fraction or pass validation"
        validation = _Part(held, where, source, "held_out", remedy) if held else None
    return _Part(examples, train_records.description, source, "train", "add data"), validation


def _build(part: _Part, tokenizer: PreTrainedTokenizerBase, spec: TrainDataSpec) -> tuple[TokenBlocks, SplitSummary]:
    return build_split(part.examples, part.source, tokenizer, BlockLayout(spec.seq_len, spec.pack, part.where, part.remedy))


def _hold_out(examples: list[Example], spec: TrainDataSpec, where: str) -> tuple[list[Example], list[Example]]:
    """Hold out ``val_fraction`` of the examples (at least one), chosen with ``seed``; order kept."""
    if spec.val_fraction == 0:
        return examples, []
    count = len(examples)
    held = max(1, round(count * spec.val_fraction))
    if held >= count:
        raise DataError(
            f"{where} holds {count} document(s): too few to hold out val_fraction {spec.val_fraction} "
            f"({held}) and keep any for training; add documents, pass validation, or set val_fraction=0"
        )
    generator = torch.Generator().manual_seed(spec.seed)
    chosen = set(torch.randperm(count, generator=generator)[:held].tolist())
    train = [example for i, example in enumerate(examples) if i not in chosen]
    validation = [example for i, example in enumerate(examples) if i in chosen]
    return train, validation


# --------------------------------------------------------------------------- reading


def _read(path_text: str | Path, key: str, split: str) -> Records:
    """Read the file or ``save_to_disk`` directory given as spec key ``key`` (``train``, ``validation``)."""
    return read_records(Path(path_text).expanduser().resolve(), key, split)


def split_documents(text: str, min_chars: int = TXT_MIN_DOCUMENT_CHARS) -> list[str]:
    """Split the text of a ``.txt`` file into documents.

    If the text holds a form feed (``"\\f"``), documents are the pieces between form feeds.
    Otherwise the text is cut at blank lines (runs of lines that are empty or hold only
    spaces/tabs) and consecutive paragraphs are grouped until a document has at least
    ``min_chars`` characters; a shorter last group joins the document before it. Documents
    are exact slices of ``text`` (separators removed, nothing else changed); whitespace-only
    pieces are dropped.

    Args:
        text: Contents of the file.
        min_chars: Smallest document length when cutting at blank lines.

    Returns:
        The documents in file order.
    """
    if "\f" in text:
        return [piece for piece in text.split("\f") if piece.strip()]
    starts, ends = [0], []
    for separator in _BLANK_LINES.finditer(text):
        if separator.start() - starts[-1] >= min_chars:
            ends.append(separator.start())
            starts.append(separator.end())
    ends.append(len(text))
    if len(starts) > 1 and ends[-1] - starts[-1] < min_chars:  # short tail: merge backwards
        starts.pop()
        ends.pop(-2)
    return [text[a:b] for a, b in zip(starts, ends) if text[a:b].strip()]


def _examples(
    records: Records,
    fields: TextFields | InstructionFields,
    layout: ExampleLayout,
    tokenizer: PreTrainedTokenizerBase,
) -> list[Example]:
    """Turn the records of a source into examples (pieces with their scored flag)."""
    if isinstance(fields, TextFields):
        texts = records.texts("text" if records.is_txt else fields.text_field, "fields.text_field", skip_missing=True)
        documents = split_documents("".join(texts)) if records.is_txt else [text for text in texts if text]
        examples = [text_example(text, layout) for text in documents]
    elif records.is_txt:
        raise DataError(
            f"{records.description}: a .txt file holds plain text, but fields is InstructionFields; "
            f"use TextFields or a .jsonl/.json/.parquet file or dataset directory with columns "
            f"{list(layout.fields)}"
        )
    elif fields.messages_field is not None:
        examples = chat_examples(records, fields.messages_field, layout, tokenizer)
    else:
        examples = prompt_response_examples(records, fields, layout, tokenizer)
    if not examples:
        column = "text" if records.is_txt else ", ".join(layout.fields)
        raise DataError(f"{records.description} is empty: no documents in field(s) {column}")
    return examples
