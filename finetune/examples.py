"""Fine-tuning records turned into examples: pieces of text or token ids, each scored or not.

Two formats, chosen by the type of the fields:

- :class:`TextFields` (plain text): each document becomes ``tokenizer(text)["input_ids"]``
  (a leading BOS only where the tokenizer adds one; see :mod:`dsq.core.tokens`) ending in EOS
  (the tokenizer's own suffix, else its EOS when it has one), and every token is scored.
- :class:`InstructionFields`: prompt tokens are context, response tokens (and the EOS after
  them) are scored. A ``messages`` column, or a prompt/response pair when the tokenizer has
  a chat template, is rendered by :mod:`dsq.core.chat` and only the assistant turns are
  scored (the template supplies BOS and turn markers; EOS is added only if the render does
  not end with it); without a template a prompt/response pair becomes
  ``[BOS] prompt "\\n" response [EOS]`` with BOS and EOS as for plain text.

Example:
    >>> layout = example_layout(InstructionFields(messages_field="messages"), tokenizer)
    >>> examples = chat_examples(records, "messages", layout, tokenizer)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dsq.core.chat import chats, render_chat
from dsq.core.errors import DataError
from dsq.core.textdata import Location, Records
from dsq.core.tokens import special_tokens

from .packing import Example, Piece, token_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def check_name(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` (the setting ``name``) is a non-empty string."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


@dataclass(frozen=True)
class TextFields:
    """Plain-text corpus: every token is scored.

    Args:
        text_field: Column holding each document in ``.jsonl``/``.json``/``.parquet`` files
            and dataset directories. Not used for ``.txt`` files
            (see :func:`dsq.finetune.data.split_documents`).
    """

    text_field: str = "text"

    def __post_init__(self) -> None:
        check_name("text_field", self.text_field)


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
        check_name("prompt_field", self.prompt_field)
        check_name("response_field", self.response_field)
        if self.messages_field is not None:
            check_name("messages_field", self.messages_field)


@dataclass(frozen=True)
class ExampleLayout:
    """How records become examples, decided once from the fields and the tokenizer.

    Attributes:
        format: ``"text"``, ``"prompt_response"`` or ``"messages"`` (as the run report names it).
        fields: Columns read.
        chat_template: Examples are rendered with the tokenizer's chat template.
        prefix: Ids the tokenizer puts before a text (its BOS, if it adds one).
        end: Ids closing an example: the tokenizer's own suffix, else its EOS.
        eos: The tokenizer's EOS id, if any.
        hint: What to change when nothing is scored.
    """

    format: str
    fields: tuple[str, ...]
    chat_template: bool
    prefix: tuple[int, ...]
    end: tuple[int, ...]
    eos: int | None
    hint: str


def example_layout(fields: TextFields | InstructionFields, tokenizer: PreTrainedTokenizerBase) -> ExampleLayout:
    """Decide the format, the columns and the special tokens of every example.

    Args:
        fields: The columns to read and their format.
        tokenizer: Hugging Face tokenizer of the model being fine-tuned.

    Returns:
        The layout shared by every example of the run.

    Raises:
        DataError: As :func:`dsq.core.tokens.special_tokens`.
    """
    eos = token_id(tokenizer, "eos_token_id")
    added = special_tokens(tokenizer)
    end = added.suffix or (() if eos is None else (eos,))
    if isinstance(fields, TextFields):
        return ExampleLayout("text", (fields.text_field,), False, added.prefix, end, eos, "the documents hold no text")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    hint = "check that responses (assistant turns) are not empty and fit in seq_len"
    if fields.messages_field is not None:
        return ExampleLayout("messages", (fields.messages_field,), True, added.prefix, end, eos, hint)
    columns = (fields.prompt_field, fields.response_field)
    return ExampleLayout("prompt_response", columns, has_template, added.prefix, end, eos, hint)


def text_example(text: str, layout: ExampleLayout) -> Example:
    """``prefix text end`` (``[BOS] text [EOS]`` for a Llama tokenizer), every token scored."""
    pieces: list[Piece] = [(token, True) for token in layout.prefix]
    pieces.append((text, True))
    pieces += [(token, True) for token in layout.end]
    return tuple(pieces)


def prompt_response_examples(
    records: Records, fields: InstructionFields, layout: ExampleLayout, tokenizer: PreTrainedTokenizerBase
) -> list[Example]:
    """One example per row: a user/assistant chat with a template, else ``prompt "\\n" response``.

    Raises:
        DataError: A column is missing or a value is not a string (naming the record and field).
    """
    prompts = records.texts(fields.prompt_field, "fields.prompt_field", skip_missing=False)
    responses = records.texts(fields.response_field, "fields.response_field", skip_missing=False)
    examples: list[Example] = []
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        if layout.chat_template:
            chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            examples.append(_chat_example(chat, tokenizer, layout, Location(records, row)))
        else:
            pieces: list[Piece] = [(token, False) for token in layout.prefix]
            pieces += [(prompt + "\n", False), (response, True)]
            pieces += [(token, True) for token in layout.end]
            examples.append(tuple(pieces))
    return examples


def chat_examples(
    records: Records, field: str, layout: ExampleLayout, tokenizer: PreTrainedTokenizerBase
) -> list[Example]:
    """One example per row of chat messages; rows without a value and empty chats are skipped.

    Raises:
        DataError: The column is missing, the tokenizer has no chat template, or a record is
            not a chat or cannot be rendered (naming the record and field).
    """
    examples: list[Example] = []
    remedy = "set tokenizer.chat_template or use prompt_field/response_field"
    for where, messages in chats(records, field, "fields.messages_field", tokenizer, remedy):
        if messages:
            examples.append(_chat_example(messages, tokenizer, layout, where))
    return examples


def _chat_example(
    messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, layout: ExampleLayout, where: Location
) -> Example:
    """Render a chat and mark the text of its assistant turns as scored.

    An assistant turn ``i`` spans from the end of ``render(messages[:i],
    add_generation_prompt=True)`` (so the assistant header is context) to the end of
    ``render(messages[:i + 1])`` (so the template's end-of-turn text is scored). Both
    renders must be prefixes of the full render, which holds for templates that render
    each message independently. A conversation that opens with an assistant turn has no
    prefix to render, so that turn's header is scored too. EOS is appended (scored when
    the last message is an assistant turn) when the render does not end with it.
    """
    full = render_chat(tokenizer, messages, where)
    pieces: list[Piece] = []
    done = 0  # characters of ``full`` already in pieces
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], where, add_generation_prompt=True) if i else ""
        through = render_chat(tokenizer, messages[: i + 1], where)
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
