"""Chat records rendered to text with the tokenizer's own chat template.

Calibration (``dsq.quantize.calibration_data``) and fine-tuning (``dsq.finetune.data``) read
chats as a column of message lists. Each record is checked once (:func:`chat_messages`) and
rendered with ``tokenizer.apply_chat_template(messages, tokenize=False)``
(:func:`render_chat`); every error is a :class:`~dsq.core.errors.DataError` naming the file,
the record (its line in a JSON-lines file) and the field.

Example:
    >>> require_chat_template(tokenizer, f"{records.description}: messages_field 'messages' is set", "...")
    >>> messages = chat_messages(value, Location(records, row, "messages"))
    >>> text = render_chat(tokenizer, messages, Location(records, row, "messages"))
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dsq.core.errors import DataError
from dsq.core.textdata import Location, Records, short_repr


def require_chat_template(tokenizer: Any, reason: str, remedy: str) -> None:
    """Check that the tokenizer has a chat template.

    Args:
        tokenizer: A Hugging Face tokenizer.
        reason: Why one is needed, opening the message (``"train file X: fields.messages_field 'm' is set"``).
        remedy: What to change instead, closing the message.

    Raises:
        DataError: The tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"{reason} but the tokenizer {name!r} has no chat template; {remedy}")


def chat_messages(value: Any, where: Location) -> list[dict[str, Any]]:
    """Check one record's chat and return its messages.

    Args:
        value: The record's value: a list of ``{"role": str, "content": str}`` dicts.
        where: The record, for the message.

    Returns:
        The messages, each without the keys whose value is ``None`` (a table fills a key
        one message lacks with ``None``; the template sees the message as written).

    Raises:
        DataError: ``value`` is not such a list (the message names file, record and field).
    """
    ok = isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    if not ok:
        raise DataError(
            f"{where}: must be a list of {{'role': str, 'content': str}} messages, got {short_repr(value, 200)}"
        )
    return [{k: v for k, v in message.items() if v is not None} for message in value]


def render_chat(
    tokenizer: Any, messages: list[dict[str, Any]], where: Location, *, add_generation_prompt: bool = False
) -> str:
    """Render messages as text with the tokenizer's chat template.

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template.
        messages: Checked messages (:func:`chat_messages`).
        where: The record, for the message.
        add_generation_prompt: Close with the header of an assistant turn.

    Returns:
        The rendered text (special tokens as text; encode it without adding any).

    Raises:
        DataError: The template raised (e.g. ``raise_exception`` on a role order it refuses).
    """
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja errors raised by the template itself
        raise DataError(f"{where}: the chat template failed: {exc}") from exc
    return str(text)


def chats(records: Records, field: str, key: str, tokenizer: Any, remedy: str) -> Iterator[tuple[Location, list[dict[str, Any]]]]:
    """Each record's chat in column ``field`` (rows without a value skipped), checked, with where it came from.

    Args:
        records: The records read from a file.
        field: The column holding chat messages.
        key: The setting that named the column (for messages, e.g. ``messages_field``).
        tokenizer: Must have a chat template.
        remedy: What to do instead when it has none.

    Raises:
        DataError: The column is missing, the tokenizer has no chat template, or a value is not a chat.
    """
    values = records.column(field, key)
    require_chat_template(tokenizer, f"{records.description}: {key} {field!r} is set", remedy)
    for row, value in enumerate(values):
        if value is None:
            continue
        where = Location(records, row, field)
        yield where, chat_messages(value, where)
