"""Fine-tuning examples cut into token blocks: packed ``seq_len`` blocks or one padded block each.

An example is a sequence of pieces (text to tokenize, or one token id), each scored or not
(see :mod:`dsq.finetune.examples`). Packing concatenates the examples of a split and cuts
``seq_len`` blocks (every position attends, across document borders; the ragged tail is
dropped and counted); without packing each example is one right-padded (and, if longer,
truncated) block. Blocks without a single scored token are dropped (they carry no loss).

Example:
    >>> blocks, summary = build_split(examples, tokenizer, seq_len=256, pack=True, where="train file x", remedy="add data")
    >>> blocks.input_ids.shape  # (blocks, 256)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dsq.core.errors import DataError
from dsq.core.tokens import encode_texts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label of positions that are not scored (Hugging Face convention)."""

Piece = tuple[str | int, bool]
"""Text to tokenize or one token id, and whether its tokens are scored."""

Example = tuple[Piece, ...]
"""One document or instruction example, as pieces in order."""


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
class BlockLayout:
    """How a split is cut: block length, packing, and how to name the split in messages.

    Attributes:
        seq_len: Tokens per block.
        pack: Pack examples into full blocks (else one right-padded block per example).
        where: The split in messages (``"train file PATH"``).
        remedy: What to change when the split is too short for one block.
    """

    seq_len: int
    pack: bool
    where: str
    remedy: str


def build_split(
    examples: Sequence[Example], source: str, tokenizer: PreTrainedTokenizerBase, layout: BlockLayout
) -> tuple[TokenBlocks, SplitSummary]:
    """Tokenize a split's examples and cut them into blocks; drop blocks without a scored position.

    Args:
        examples: The split's examples.
        source: Resolved file or directory they came from (for the summary).
        tokenizer: Hugging Face tokenizer of the model being fine-tuned.
        layout: Block length, packing and names for messages.

    Returns:
        The kept blocks and the split's summary.

    Raises:
        DataError: Packed examples hold fewer tokens than one block.
    """
    tokenized = _tokenize(examples, tokenizer)
    tokens = sum(len(ids) for ids, _ in tokenized)
    if layout.pack:
        blocks, truncated = _pack(tokenized, layout), 0
    else:
        blocks, truncated = _pad(tokenized, layout.seq_len, _pad_id(tokenizer))
    keep = (blocks.labels != IGNORE_INDEX).any(dim=1)  # (N,)
    blocks = TokenBlocks(blocks.input_ids[keep], blocks.labels[keep], blocks.attention_mask[keep])
    attended = int(blocks.attention_mask.sum())
    scored = blocks.scored_tokens()
    summary = SplitSummary(
        source=source,
        documents=len(examples),
        tokens=tokens,
        blocks=len(blocks),
        scored_tokens=scored,
        scored_share=scored / attended if attended else 0.0,
        truncated_examples=truncated,
        dropped_tokens=tokens - attended,
        unscored_blocks=int((~keep).sum()),
    )
    return blocks, summary


def empty_split(seq_len: int) -> tuple[TokenBlocks, SplitSummary]:
    """No blocks, and the summary of a split that has no source."""
    empty = torch.zeros((0, seq_len), dtype=torch.int64)
    blocks = TokenBlocks(empty, empty.clone(), empty.clone())
    return blocks, SplitSummary(None, 0, 0, 0, 0, 0.0, 0, 0, 0)


def token_id(tokenizer: PreTrainedTokenizerBase, name: str) -> int | None:
    """The tokenizer's id attribute ``name`` (``"eos_token_id"``) as an int, or None."""
    value = getattr(tokenizer, name, None)
    return None if value is None else int(value)


def _tokenize(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase
) -> list[tuple[list[int], list[bool]]]:
    """Tokenize every text piece (no special tokens added); return ``(ids, scored)`` per example."""
    texts = [piece for example in examples for piece, _ in example if isinstance(piece, str)]
    pieces = encode_texts(tokenizer, texts)
    result = []
    for example in examples:
        ids: list[int] = []
        scored: list[bool] = []
        for piece, is_scored in example:
            piece_ids = next(pieces) if isinstance(piece, str) else [piece]
            ids += piece_ids
            scored += [is_scored] * len(piece_ids)
        result.append((ids, scored))
    return result


def _pack(tokenized: Sequence[tuple[list[int], list[bool]]], layout: BlockLayout) -> TokenBlocks:
    """Concatenate all examples and cut full ``seq_len`` blocks (the ragged tail is dropped)."""
    seq_len = layout.seq_len
    ids = torch.tensor([i for example, _ in tokenized for i in example], dtype=torch.int64)  # (T,)
    scored = torch.tensor([s for _, flags in tokenized for s in flags], dtype=torch.bool)  # (T,)
    count = ids.numel() // seq_len
    if count == 0:
        raise DataError(
            f"{layout.where} is too short: {ids.numel()} tokens in {len(tokenized)} document(s), fewer than one "
            f"block of seq_len {seq_len}; lower seq_len to at most {max(ids.numel(), 2)} or {layout.remedy}"
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
        value = token_id(tokenizer, name)
        if value is not None:
            return value
    return 0
