"""Zero-shot multiple-choice accuracy by log-likelihood, following lm-evaluation-harness.

Each choice is scored by the summed log-probability of its tokens given the context.
Context and continuation are tokenized the way lm-evaluation-harness does it: trailing
whitespace of the context moves to the front of the continuation, the whole string
``context + choice`` is encoded once, and the continuation tokens are those after the
first ``len(encode(context))`` tokens, so a BPE merge across the boundary is kept.

``acc`` picks the choice with the highest summed log-probability; ``acc_norm`` divides
that sum by the choice's length in UTF-8 bytes first.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dsq.errors import DataError
from dsq.eval.data import MCItem


@dataclass(frozen=True)
class MCResult:
    """Multiple-choice accuracy.

    Attributes:
        acc: Fraction of items whose highest-likelihood choice is the gold one (0..1).
        acc_norm: Same with log-likelihood divided by the choice's UTF-8 byte length.
        n: Number of items.
    """

    acc: float
    acc_norm: float
    n: int


@dataclass(frozen=True)
class _Request:
    """One (item, choice) pair: the model input; its last ``len(continuation)`` positions are scored."""

    item: int
    choice: int
    input_ids: tuple[int, ...]
    continuation: tuple[int, ...]


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Encode ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Split ``context + continuation`` into context and continuation tokens as lm-eval does.

    Args:
        tokenizer: A Hugging Face tokenizer.
        context: Prompt text.
        continuation: Choice text appended verbatim.

    Returns:
        ``(context_ids, continuation_ids)``; special tokens are not added.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def _prefix_ids(tokenizer: Any, add_bos: bool) -> list[int]:
    """Tokens put before every context: BOS when requested and defined."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [int(bos)] if add_bos and bos is not None else []


def _requests(
    tokenizer: Any, items: Sequence[MCItem], add_bos: bool, max_length: int | None
) -> list[_Request]:
    """Tokenize every (item, choice) pair into a scoring request."""
    prefix = _prefix_ids(tokenizer, add_bos)
    fallback = getattr(tokenizer, "eos_token_id", None)
    requests: list[_Request] = []
    for item_index, item in enumerate(items):
        for choice_index, choice in enumerate(item.choices):
            context_ids, continuation_ids = encode_pair(tokenizer, item.context, choice)
            context_ids = prefix + context_ids
            if not context_ids:
                if fallback is None:
                    raise DataError(
                        f"multiple-choice item {item_index} has an empty context and the tokenizer "
                        "has neither a BOS nor an EOS token to condition on"
                    )
                context_ids = [int(fallback)]
            if not continuation_ids:
                raise DataError(f"multiple-choice item {item_index}, choice {choice_index} produced no tokens")
            full = context_ids + continuation_ids
            if max_length is not None:
                full = full[-(max_length + 1) :]
            n_scored = min(len(continuation_ids), len(full) - 1)
            requests.append(
                _Request(
                    item=item_index,
                    choice=choice_index,
                    input_ids=tuple(full[:-1]),
                    continuation=tuple(continuation_ids[len(continuation_ids) - n_scored :]),
                )
            )
    return requests


def _score_batch(model: nn.Module, batch: list[_Request], pad_id: int) -> list[float]:
    """Summed continuation log-probabilities for a right-padded batch of requests."""
    width = max(len(r.input_ids) for r in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (batch, seq)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (batch, seq)
    for row, request in enumerate(batch):
        input_ids[row, : len(request.input_ids)] = torch.tensor(request.input_ids, dtype=torch.long)
        attention_mask[row, : len(request.input_ids)] = 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (batch, seq, vocab)
    scores: list[float] = []
    for row, request in enumerate(batch):
        end = len(request.input_ids)
        n = len(request.continuation)
        logprobs = torch.log_softmax(logits[row, end - n : end].float(), dim=-1)  # (n, vocab)
        targets = torch.tensor(request.continuation, dtype=torch.long).unsqueeze(-1)  # (n, 1)
        scores.append(logprobs.gather(-1, targets).sum().item())
    return scores


def _accuracy(items: Sequence[MCItem], loglik: list[list[float]], normalize: bool) -> float:
    """Fraction of items whose best-scoring choice is gold (first choice wins ties)."""
    correct = 0
    for item, scores in zip(items, loglik):
        if normalize:
            scores = [s / len(c.encode("utf-8")) for s, c in zip(scores, item.choices)]
        best = max(range(len(scores)), key=lambda i: scores[i])
        correct += int(best == item.gold)
    return correct / len(items)


def multiple_choice(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[MCItem],
    *,
    progress: bool = True,
    batch_size: int = 16,
    add_bos: bool = True,
    max_length: int | None = None,
) -> MCResult:
    """Score multiple-choice items by continuation log-likelihood.

    Args:
        model: Causal LM called as ``model(input_ids=..., attention_mask=...).logits``.
        tokenizer: The model's Hugging Face tokenizer.
        items: Items to score.
        progress: Show a tqdm progress bar.
        batch_size: (item, choice) pairs per forward pass; pairs are right-padded.
        add_bos: Prepend the tokenizer's BOS token to every context when it has one.
        max_length: Truncate each input from the left to this many tokens (``None``: no limit).

    Returns:
        ``acc``, ``acc_norm`` and the number of items.

    Raises:
        DataError: No items, or a pair cannot be tokenized into a scorable request.
    """
    if not items:
        raise DataError("multiple-choice evaluation needs at least one item")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    requests = _requests(tokenizer, items, add_bos, max_length)
    # Longest first: batches hold similar lengths, and an out-of-memory shows up at once.
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].input_ids))
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    loglik = [[0.0] * len(item.choices) for item in items]
    with torch.inference_mode(), tqdm(total=len(requests), desc="multiple choice", unit="pair", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = [requests[i] for i in order[start : start + batch_size]]
            for request, score in zip(batch, _score_batch(model, batch, pad_id)):
                loglik[request.item][request.choice] = score
            bar.update(len(batch))
    return MCResult(
        acc=_accuracy(items, loglik, normalize=False),
        acc_norm=_accuracy(items, loglik, normalize=True),
        n=len(items),
    )
