"""The special tokens a tokenizer adds around a text, as its own ``tokenizer(text)`` does.

Checkpoints ship tokenizers that differ here: a Llama sentencepiece tokenizer prepends BOS
(and appends EOS with ``add_eos_token``), a GPT-2 or Qwen2 style BPE tokenizer adds nothing
even when it names a BOS token. Every data path of dsq (calibration, perplexity, multiple
choice, training data) encodes text pieces without special tokens and puts exactly these
ids around them, so its token streams equal ``tokenizer(text)["input_ids"]``: BOS only where
the tokenizer adds it, never twice, and an EOS the tokenizer appends is kept.

Example:
    >>> added = special_tokens(tokenizer)
    >>> [*added.prefix, *tokenizer("hi", add_special_tokens=False)["input_ids"], *added.suffix]
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dsq.core.errors import DataError

_PROBE = "Hello world"  # any text that encodes to at least one token
_BATCH = 256  # texts per tokenizer call


@dataclass(frozen=True)
class SpecialTokens:
    """Ids a tokenizer puts before and after the tokens of one text.

    Attributes:
        prefix: Ids before the text (``(bos,)`` for Llama tokenizers, ``()`` for GPT-2 style).
        suffix: Ids after the text (``(eos,)`` with ``add_eos_token``, usually ``()``).
    """

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]


def special_tokens(tokenizer: Any) -> SpecialTokens:
    """Find the special tokens ``tokenizer(text)`` adds around the text's own tokens.

    Args:
        tokenizer: A Hugging Face tokenizer.

    Returns:
        The ids added before and after a text.

    Raises:
        DataError: The encoding with special tokens does not contain the plain encoding
            as one contiguous run, so the added ids cannot be told apart.
    """
    plain = [int(i) for i in tokenizer(_PROBE, add_special_tokens=False, verbose=False)["input_ids"]]
    full = [int(i) for i in tokenizer(_PROBE, verbose=False)["input_ids"]]
    for start in range(len(full) - len(plain) + 1):
        if plain and full[start : start + len(plain)] == plain:
            return SpecialTokens(tuple(full[:start]), tuple(full[start + len(plain) :]))
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise DataError(
        f"tokenizer {name!r}: encoding {_PROBE!r} with special tokens gives {full}, which does not contain "
        f"its encoding without them ({plain}); dsq cannot tell which ids the tokenizer adds"
    )


def encode_document(tokenizer: Any, text: str, *, with_prefix: bool = True) -> list[int]:
    """Encode one text as ``tokenizer(text)["input_ids"]`` does.

    Args:
        tokenizer: A Hugging Face tokenizer.
        text: The text.
        with_prefix: Keep the ids the tokenizer puts before the text (its BOS, if any).

    Returns:
        Token ids: prefix (when ``with_prefix``), the text's tokens, suffix.

    Raises:
        DataError: As :func:`special_tokens`.
    """
    added = special_tokens(tokenizer)
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]]
    return [*(added.prefix if with_prefix else ()), *ids, *added.suffix]


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> Iterator[list[int]]:
    """Encode texts without special tokens, a batch at a time.

    Args:
        tokenizer: A Hugging Face tokenizer.
        texts: The texts.

    Yields:
        The ids of each text, in order (``[]`` for a text that gives no tokens).
    """
    for start in range(0, len(texts), _BATCH):
        batch = list(texts[start : start + _BATCH])
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            yield list(ids)
