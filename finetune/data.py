"""Training data for fine-tuning: plain text or instruction data cut into token blocks.

Sources are local files (``.txt``, ``.jsonl``/``.json``, ``.parquet``) or directories written
by ``datasets``' ``save_to_disk``, read through the ``datasets`` packaged builders with a
throw-away cache (nothing is written to the user's cache; an edited file is always re-read).
A table has one document per row; a ``.txt`` file is cut into documents at form feeds, or
else at blank lines into groups of at least 2,000 characters (:func:`split_documents`).

Two formats, chosen by the type of ``TrainDataSpec.fields``:

- :class:`TextFields` (plain text): each document becomes ``tokenizer(text)["input_ids"]``
  (a leading BOS only where the tokenizer adds one; see :mod:`dsq.core.tokens`) ending in EOS
  (the tokenizer's own suffix, else its EOS when it has one), and every token is scored
  (``labels == input_ids``).
- :class:`InstructionFields`: prompt tokens get label ``-100``, response tokens (and the
  EOS after them) are scored. A ``messages`` column, or a prompt/response pair when the
  tokenizer has a chat template, is rendered with ``tokenizer.apply_chat_template`` and
  only the assistant turns are scored (the template supplies BOS and turn markers; EOS is
  added only if the render does not end with it); without a template a prompt/response pair
  becomes ``[BOS] prompt "\\n" response [EOS]`` with BOS and EOS as for plain text.

Documents (or examples) are split into train and validation *before* packing, so no
validation text reaches a training block. Packing concatenates the examples of a split and
cuts ``seq_len`` blocks (every position attends, across document borders; the ragged tail
is dropped and counted); ``pack=False`` gives one right-padded block per example. Blocks
without a single scored token are dropped (they carry no loss). The same spec and tokenizer
always give the same tensors.

Example:
    >>> spec = TrainDataSpec(train="domain_train.txt", validation="domain_heldout.txt", seq_len=256)
    >>> data = load_training_data(spec, tokenizer)
    >>> data.train.input_ids.shape  # (blocks, 256)
    >>> data.summary.to_dict()["train"]["blocks"]
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch

from dsq.core.errors import DataError
from dsq.core.textdata import load_directory, load_file
from dsq.core.tokens import special_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label of positions that are not scored (Hugging Face convention)."""

TXT_MIN_DOCUMENT_CHARS = 2000
"""Without form feeds, a ``.txt`` file is cut at blank lines into documents of at least this many characters."""

_TOKENIZE_BATCH = 256  # text pieces per tokenizer call
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")  # one or more blank (or whitespace-only) lines

# An example is a sequence of pieces: text to tokenize or one token id, each scored or not.
_Piece = tuple[str | int, bool]
_Example = tuple[_Piece, ...]


# --------------------------------------------------------------------------- spec


def _check_name(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


@dataclass(frozen=True)
class TextFields:
    """Plain-text corpus: every token is scored.

    Args:
        text_field: Column holding each document in ``.jsonl``/``.json``/``.parquet`` files
            and dataset directories. Not used for ``.txt`` files (see :func:`split_documents`).
    """

    text_field: str = "text"

    def __post_init__(self) -> None:
        _check_name("text_field", self.text_field)


@dataclass(frozen=True)
class InstructionFields:
    """Instruction data: prompts are context (label -100), responses are scored.

    Args:
        prompt_field: Column holding the prompt (used when ``messages_field`` is None).
        response_field: Column holding the response (used when ``messages_field`` is None).
        messages_field: If set, column holding a chat (a list of ``{"role", "content"}``)
            rendered with the tokenizer's chat template; only ``assistant`` turns are scored.
    """

    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str | None = None

    def __post_init__(self) -> None:
        _check_name("prompt_field", self.prompt_field)
        _check_name("response_field", self.response_field)
        if self.messages_field is not None:
            _check_name("messages_field", self.messages_field)


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
        _check_name("split", self.split)
        _check_name("validation_split", self.validation_split)
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
class TokenBlocks:
    """Token blocks ready for a causal LM (the model shifts the labels).

    Attributes:
        input_ids: ``(N, L)`` int64 token ids.
        labels: ``(N, L)`` int64; ``input_ids`` where scored, ``-100`` elsewhere
            (prompt tokens, padding).
        attention_mask: ``(N, L)`` int64; 0 on padding.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("input_ids", "labels", "attention_mask"):
            tensor = getattr(self, name)
            if tensor.dim() != 2 or tensor.dtype != torch.int64 or tensor.shape != self.input_ids.shape:
                raise ValueError(
                    f"{name} must be a 2-D int64 tensor of shape {tuple(self.input_ids.shape)}, "
                    f"got {tensor.dtype} {tuple(tensor.shape)}"
                )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def scored_tokens(self) -> int:
        """Number of positions with a label other than -100."""
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class SplitSummary:
    """How one split (train or validation) was built.

    Attributes:
        source: Resolved file or directory the documents came from (None: no validation).
        documents: Documents (plain text) or examples (instruction data) in the split.
        tokens: Tokens of those examples before cutting (BOS/EOS included).
        blocks: Blocks of ``seq_len`` tokens kept.
        scored_tokens: Positions with a label (not -100) in the kept blocks.
        scored_share: ``scored_tokens`` over attended (non-padding) positions.
        truncated_examples: Examples cut at ``seq_len`` (``pack=False`` only).
        dropped_tokens: Tokens not in any kept block: the packing tail, truncated tokens
            and tokens of blocks without a scored position.
        unscored_blocks: Blocks dropped because no position in them was scored.
    """

    source: str | None
    documents: int
    tokens: int
    blocks: int
    scored_tokens: int
    scored_share: float
    truncated_examples: int
    dropped_tokens: int
    unscored_blocks: int


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
            a column; a record is malformed (the message names the row); the data gives no
            scored token or too few tokens for one block; the validation set is empty.
    """
    layout = _layout(spec.fields, tokenizer)
    train_src = _read_source(spec.train, "train", spec.split)
    train, validation = _parts(spec, layout, tokenizer, train_src)
    train_blocks, train_summary = _build_split(train, tokenizer, spec)
    if train_summary.scored_tokens == 0:
        raise DataError(f"{train.where} gives no scored tokens (every label is -100); {layout.hint}")
    if validation is None:
        val_blocks, val_summary = _empty_split(spec.seq_len)
    else:
        val_blocks, val_summary = _build_split(validation, tokenizer, spec)
        if len(val_blocks) == 0:
            raise DataError(f"validation set is empty: {validation.where} gives no block with a scored token")
    summary = DataSummary(
        train=train_summary,
        validation=val_summary,
        validation_from="none" if validation is None else validation.origin,
        format=layout.format,
        fields=() if train_src.is_txt else layout.fields,
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

    examples: list[_Example]
    where: str  # e.g. "train file PATH"
    source: str  # resolved path
    origin: str  # train | file | held_out
    remedy: str  # what to change when it is too short


def _parts(
    spec: TrainDataSpec, layout: _Layout, tokenizer: PreTrainedTokenizerBase, train_src: _Source
) -> tuple[_Part, _Part | None]:
    """Return the train part and the validation part (None when nothing is held out)."""
    examples = _examples(train_src, spec.fields, layout, tokenizer)
    if spec.validation is not None:
        val_src = _read_source(spec.validation, "validation", spec.validation_split)
        val_examples = _examples(val_src, spec.fields, layout, tokenizer)
        validation = _Part(val_examples, val_src.description, val_src.resolved, "file", "add data")
    else:
        examples, held = _hold_out(examples, spec, train_src.description)
        where = f"validation documents held out of {train_src.description}"
        remedy = "raise val_fraction or pass validation"
        validation = _Part(held, where, train_src.resolved, "held_out", remedy) if held else None
    return _Part(examples, train_src.description, train_src.resolved, "train", "add data"), validation


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Source:
    """A loaded source: its records and how to name it in messages."""

    table: datasets.Dataset
    resolved: str  # absolute path
    description: str  # "train file PATH" or "validation directory PATH (split 'S')"
    is_txt: bool  # a .txt file: one row, column "text"


def _read_source(path_text: str | Path, key: str, split: str) -> _Source:
    """Read the file or ``save_to_disk`` directory given as spec key ``key``."""
    path = Path(path_text).expanduser().resolve()
    if path.is_dir():
        table, description = _load_directory(path, split, f"{key} directory {path}")
        return _Source(table, str(path), description, False)
    description = f"{key} file {path}"
    return _Source(load_file(path, description), str(path), description, path.suffix.lower() == ".txt")


def _load_directory(path: Path, split: str, description: str) -> tuple[datasets.Dataset, str]:
    """Read a ``save_to_disk`` directory (``split`` of a ``DatasetDict``); return it and its description."""
    loaded = load_directory(path, split, description)
    is_dict = (path / "dataset_dict.json").is_file()
    return loaded, (f"{description} (split {split!r})" if is_dict else description)


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


# --------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class _Layout:
    """How records become examples, decided once from the fields and the tokenizer."""

    format: str  # text | prompt_response | messages
    fields: tuple[str, ...]  # columns read
    chat_template: bool
    prefix: tuple[int, ...]  # ids the tokenizer puts before a text (its BOS, if it adds one)
    end: tuple[int, ...]  # ids closing an example: the tokenizer's own suffix, else its EOS
    eos: int | None
    hint: str  # what to change when nothing is scored


def _layout(fields: TextFields | InstructionFields, tokenizer: PreTrainedTokenizerBase) -> _Layout:
    eos = _token_id(tokenizer, "eos_token_id")
    added = special_tokens(tokenizer)
    end = added.suffix or (() if eos is None else (eos,))
    if isinstance(fields, TextFields):
        return _Layout("text", (fields.text_field,), False, added.prefix, end, eos, "the documents hold no text")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    hint = "check that responses (assistant turns) are not empty and fit in seq_len"
    if fields.messages_field is not None:
        return _Layout("messages", (fields.messages_field,), True, added.prefix, end, eos, hint)
    columns = (fields.prompt_field, fields.response_field)
    return _Layout("prompt_response", columns, has_template, added.prefix, end, eos, hint)


def _token_id(tokenizer: PreTrainedTokenizerBase, name: str) -> int | None:
    value = getattr(tokenizer, name, None)
    return None if value is None else int(value)


def _examples(
    src: _Source,
    fields: TextFields | InstructionFields,
    layout: _Layout,
    tokenizer: PreTrainedTokenizerBase,
) -> list[_Example]:
    """Turn the records of ``src`` into examples (pieces with their scored flag)."""
    if layout.format == "text":
        texts = split_documents(_single_text(src)) if src.is_txt else _text_column(src, fields.text_field)
        examples = [_text_example(text, layout) for text in texts]
    elif src.is_txt:
        raise DataError(
            f"{src.description}: a .txt file holds plain text, but fields is InstructionFields; "
            f"use TextFields or a .jsonl/.json/.parquet file or dataset directory with columns "
            f"{list(layout.fields)}"
        )
    elif layout.format == "messages":
        examples = _chat_examples(src, fields.messages_field, layout, tokenizer)
    else:
        examples = _prompt_response_examples(src, fields, layout, tokenizer)
    if not examples:
        column = "text" if src.is_txt else ", ".join(layout.fields)
        raise DataError(f"{src.description} is empty: no documents in field(s) {column}")
    return examples


def _single_text(src: _Source) -> str:
    return "".join(value for value in src.table["text"] if value)


def _require_columns(src: _Source, columns: Sequence[tuple[str, str]]) -> None:
    """Check ``(column, key)`` pairs exist; the message lists the available columns."""
    for column, key in columns:
        if column not in src.table.column_names:
            raise DataError(
                f"{src.description} has no column {column!r} (fields.{key}); "
                f"columns: {src.table.column_names}"
            )


def _text_column(src: _Source, field: str) -> list[str]:
    """Return the non-empty strings of column ``field``; ``None`` cells are skipped."""
    _require_columns(src, [(field, "text_field")])
    texts: list[str] = []
    for row, value in enumerate(src.table[field]):
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(
                f"{src.description}, row {row}: field {field!r} must be a string, got {type(value).__name__}"
            )
        if value:
            texts.append(value)
    return texts


def _text_example(text: str, layout: _Layout) -> _Example:
    """``prefix text end`` (``[BOS] text [EOS]`` for a Llama tokenizer), every token scored."""
    pieces: list[_Piece] = [(token, True) for token in layout.prefix]
    pieces.append((text, True))
    pieces += [(token, True) for token in layout.end]
    return tuple(pieces)


def _prompt_response_examples(
    src: _Source, fields: InstructionFields, layout: _Layout, tokenizer: PreTrainedTokenizerBase
) -> list[_Example]:
    """One example per row: a user/assistant chat with a template, else prompt "\\n" response."""
    _require_columns(src, [(fields.prompt_field, "prompt_field"), (fields.response_field, "response_field")])
    prompts, responses = src.table[fields.prompt_field], src.table[fields.response_field]
    examples: list[_Example] = []
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        where = f"{src.description}, row {row}: field"
        _check_string(prompt, f"{where} {fields.prompt_field!r} (fields.prompt_field)")
        _check_string(response, f"{where} {fields.response_field!r} (fields.response_field)")
        if layout.chat_template:
            chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            examples.append(_chat_example(chat, tokenizer, layout, f"{src.description}, row {row}"))
        else:
            pieces: list[_Piece] = [(token, False) for token in layout.prefix]
            pieces += [(prompt + "\n", False), (response, True)]
            pieces += [(token, True) for token in layout.end]
            examples.append(tuple(pieces))
    return examples


def _check_string(value: Any, where: str) -> None:
    if not isinstance(value, str):
        raise DataError(f"{where} must be a string, got {value!r:.100}")


def _chat_examples(
    src: _Source, field: str, layout: _Layout, tokenizer: PreTrainedTokenizerBase
) -> list[_Example]:
    """One example per row of chat messages; ``None`` rows are skipped."""
    _require_columns(src, [(field, "messages_field")])
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"{src.description}: fields.messages_field {field!r} is set but the tokenizer {name!r} has no "
            f"chat template; set tokenizer.chat_template or use prompt_field/response_field"
        )
    examples: list[_Example] = []
    for row, messages in enumerate(src.table[field]):
        if messages is None:
            continue
        where = f"{src.description}, row {row} (field {field!r})"
        _check_messages(messages, where)
        if messages:
            messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
            examples.append(_chat_example(messages, tokenizer, layout, where))
    return examples


def _check_messages(messages: Any, where: str) -> None:
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not ok:
        raise DataError(
            f"{where}: must be a list of {{'role': str, 'content': str}} messages, got {messages!r:.200}"
        )


def _chat_example(
    messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, layout: _Layout, where: str
) -> _Example:
    """Render a chat and mark the text of its assistant turns as scored.

    An assistant turn ``i`` spans from the end of ``render(messages[:i],
    add_generation_prompt=True)`` (so the assistant header is context) to the end of
    ``render(messages[:i + 1])`` (so the template's end-of-turn text is scored). Both
    renders must be prefixes of the full render, which holds for templates that render
    each message independently. A conversation that opens with an assistant turn has no
    prefix to render, so that turn's header is scored too. EOS is appended (scored when
    the last message is an assistant turn) when the render does not end with it.
    """
    full = _render(tokenizer, messages, False, where)
    pieces: list[_Piece] = []
    done = 0  # characters of ``full`` already in pieces
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, where) if i else ""
        through = _render(tokenizer, messages[: i + 1], False, where)
        if not (full.startswith(through) and through.startswith(before) and len(before) >= done):
            raise DataError(
                f"{where}: the chat template does not render message {i} as a prefix of the whole "
                f"conversation, so the assistant turn cannot be located; use a template that renders "
                f"each message independently"
            )
        pieces += [(full[done : len(before)], False), (full[len(before) : len(through)], True)]
        done = len(through)
    pieces.append((full[done:], False))
    example = [piece for piece in pieces if piece[0]]
    eos_text = getattr(tokenizer, "eos_token", None)
    if layout.eos is not None and not (eos_text and full.endswith(eos_text)):
        example.append((layout.eos, messages[-1]["role"] == "assistant"))
    return tuple(example)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], prompt: bool, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    except Exception as exc:  # jinja errors raised by the template itself
        raise DataError(f"{where}: the chat template failed: {exc}") from exc
    return str(text)


def _hold_out(
    examples: list[_Example], spec: TrainDataSpec, where: str
) -> tuple[list[_Example], list[_Example]]:
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


# --------------------------------------------------------------------------- tokens and blocks


def _tokenize(
    examples: Sequence[_Example], tokenizer: PreTrainedTokenizerBase
) -> list[tuple[list[int], list[bool]]]:
    """Tokenize every text piece (no special tokens added); return ``(ids, scored)`` per example."""
    texts = [piece for example in examples for piece, _ in example if isinstance(piece, str)]
    encoded: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        batch = texts[start : start + _TOKENIZE_BATCH]
        encoded.extend(tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"])
    pieces = iter(encoded)
    result = []
    for example in examples:
        ids: list[int] = []
        scored: list[bool] = []
        for piece, is_scored in example:
            piece_ids = list(next(pieces)) if isinstance(piece, str) else [piece]
            ids += piece_ids
            scored += [is_scored] * len(piece_ids)
        result.append((ids, scored))
    return result


def _build_split(
    part: _Part, tokenizer: PreTrainedTokenizerBase, spec: TrainDataSpec
) -> tuple[TokenBlocks, SplitSummary]:
    """Tokenize a split's examples and cut them into blocks; drop blocks without a scored position."""
    tokenized = _tokenize(part.examples, tokenizer)
    tokens = sum(len(ids) for ids, _ in tokenized)
    if spec.pack:
        blocks, truncated = _pack(tokenized, spec.seq_len, part.where, part.remedy), 0
    else:
        blocks, truncated = _pad(tokenized, spec.seq_len, _pad_id(tokenizer))
    keep = (blocks.labels != IGNORE_INDEX).any(dim=1)  # (N,)
    blocks = TokenBlocks(blocks.input_ids[keep], blocks.labels[keep], blocks.attention_mask[keep])
    attended = int(blocks.attention_mask.sum())
    scored = blocks.scored_tokens()
    summary = SplitSummary(
        source=part.source,
        documents=len(part.examples),
        tokens=tokens,
        blocks=len(blocks),
        scored_tokens=scored,
        scored_share=scored / attended if attended else 0.0,
        truncated_examples=truncated,
        dropped_tokens=tokens - attended,
        unscored_blocks=int((~keep).sum()),
    )
    return blocks, summary


def _pack(
    tokenized: Sequence[tuple[list[int], list[bool]]], seq_len: int, where: str, remedy: str
) -> TokenBlocks:
    """Concatenate all examples and cut full ``seq_len`` blocks (the ragged tail is dropped)."""
    ids = torch.tensor([i for example, _ in tokenized for i in example], dtype=torch.int64)  # (T,)
    scored = torch.tensor([s for _, flags in tokenized for s in flags], dtype=torch.bool)  # (T,)
    count = ids.numel() // seq_len
    if count == 0:
        raise DataError(
            f"{where} is too short: {ids.numel()} tokens in {len(tokenized)} document(s), fewer than one "
            f"block of seq_len {seq_len}; lower seq_len to at most {max(ids.numel(), 2)} or {remedy}"
        )
    ids = ids[: count * seq_len].view(count, seq_len)  # (N, L)
    scored = scored[: count * seq_len].view(count, seq_len)  # (N, L)
    labels = torch.where(scored, ids, torch.full_like(ids, IGNORE_INDEX))
    return TokenBlocks(ids, labels, torch.ones_like(ids))


def _pad(
    tokenized: Sequence[tuple[list[int], list[bool]]], seq_len: int, pad_id: int
) -> tuple[TokenBlocks, int]:
    """One right-padded block per example, truncated at ``seq_len``; returns the truncated count."""
    count = len(tokenized)
    ids = torch.full((count, seq_len), pad_id, dtype=torch.int64)  # (N, L)
    labels = torch.full((count, seq_len), IGNORE_INDEX, dtype=torch.int64)  # (N, L)
    mask = torch.zeros((count, seq_len), dtype=torch.int64)  # (N, L)
    truncated = 0
    for row, (example_ids, flags) in enumerate(tokenized):
        truncated += len(example_ids) > seq_len
        length = min(len(example_ids), seq_len)
        row_ids = torch.tensor(example_ids[:length], dtype=torch.int64)
        row_scored = torch.tensor(flags[:length], dtype=torch.bool)
        ids[row, :length] = row_ids
        labels[row, :length] = torch.where(row_scored, row_ids, IGNORE_INDEX)
        mask[row, :length] = 1
    return TokenBlocks(ids, labels, mask), truncated


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Padding id: pad, else eos, else 0 (padding is masked out and never scored)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = _token_id(tokenizer, name)
        if value is not None:
            return value
    return 0


def _empty_split(seq_len: int) -> tuple[TokenBlocks, SplitSummary]:
    empty = torch.zeros((0, seq_len), dtype=torch.int64)
    blocks = TokenBlocks(empty, empty.clone(), empty.clone())
    return blocks, SplitSummary(None, 0, 0, 0, 0, 0.0, 0, 0, 0)
