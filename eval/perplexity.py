"""Sliding-window perplexity of a causal language model on a token stream.

The method is the Hugging Face strided evaluation. The stream ``x[0..N-1]`` gives
``N - 1`` predictions: the input at position ``i`` predicts token ``i + 1``. Windows of
``context`` model inputs start every ``stride`` positions; each window scores only the
predictions that the previous window did not score (the first window scores all of its
predictions), so every token except the first is scored exactly once, each with at least
``context - stride`` tokens of left context besides its own input. With
``stride == context`` the windows are disjoint chunks and no prediction is lost at a
chunk border: the last input of a chunk predicts the first token of the next one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dsq.core.errors import DataError, RecipeError


@dataclass(frozen=True)
class PerplexityConfig:
    """How perplexity is measured.

    Attributes:
        context: Model inputs per window (tokens the model sees at once).
        stride: Distance between window starts; ``stride <= context``.
        max_tokens: Score only the first ``max_tokens`` tokens of the stream (``None``: all).
    """

    context: int = 256
    stride: int = 128
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.context <= 0 or self.stride <= 0:
            raise RecipeError(f"perplexity context and stride must be positive, got {self.context} and {self.stride}")
        if self.stride > self.context:
            raise RecipeError(f"perplexity stride ({self.stride}) must not exceed context ({self.context})")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise RecipeError(f"perplexity max_tokens must be at least 2, got {self.max_tokens}")


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of one model on one token stream.

    Attributes:
        ppl: ``exp(nll)``.
        nll: Mean negative log-likelihood per scored token, in nats.
        tokens: Number of scored tokens (stream length minus one).
        context: Window length used.
        stride: Window stride used.
    """

    ppl: float
    nll: float
    tokens: int
    context: int
    stride: int


@dataclass(frozen=True)
class Window:
    """One perplexity window.

    Attributes:
        begin: First model input (stream position).
        end: One past the last model input; the window predicts tokens ``begin+1..end``.
        first_scored: Local index of the first prediction this window scores.
    """

    begin: int
    end: int
    first_scored: int

    @property
    def length(self) -> int:
        return self.end - self.begin


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """Plan the windows for a stream of ``n_tokens`` tokens.

    Args:
        n_tokens: Stream length ``N`` (at least 2).
        context: Inputs per window.
        stride: Distance between window starts.

    Returns:
        Windows over input positions ``0..N-2``; together they score each prediction once.
    """
    n_inputs = n_tokens - 1
    windows: list[Window] = []
    previous_end = 0
    for begin in range(0, n_inputs, stride):
        end = min(begin + context, n_inputs)
        windows.append(Window(begin=begin, end=end, first_scored=max(previous_end, begin) - begin))
        previous_end = end
        if end == n_inputs:
            break
    return windows


def _batches_by_length(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Group windows of equal length into batches of at most ``batch_size``, in stream order."""
    by_length: dict[int, list[Window]] = {}
    for window in windows:
        by_length.setdefault(window.length, []).append(window)
    return [
        group[i : i + batch_size]
        for group in by_length.values()
        for i in range(0, len(group), batch_size)
    ]


def _batch_nll(model: nn.Module, token_ids: torch.Tensor, batch: list[Window]) -> tuple[float, int]:
    """Summed NLL (nats) and count of the predictions a batch of equal-length windows scores."""
    inputs = torch.stack([token_ids[w.begin : w.end] for w in batch])  # (batch, seq)
    targets = torch.stack([token_ids[w.begin + 1 : w.end + 1] for w in batch])  # (batch, seq)
    logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits  # (batch, seq, vocab)
    total, count = 0.0, 0
    for row, window in enumerate(batch):
        scored_logits = logits[row, window.first_scored :].float()  # (scored, vocab)
        scored_targets = targets[row, window.first_scored :]  # (scored,)
        total += F.cross_entropy(scored_logits, scored_targets, reduction="sum").item()
        count += scored_targets.numel()
    return total, count


def _exp(value: float) -> float:
    """``exp(value)`` that returns ``inf`` instead of overflowing and keeps ``nan``."""
    return math.exp(value) if value < 709.0 or math.isnan(value) else math.inf


def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    config: PerplexityConfig,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> PerplexityResult:
    """Measure sliding-window perplexity (see the module docstring for the exact method).

    Args:
        model: Causal LM called as ``model(input_ids=..., attention_mask=...).logits``.
        token_ids: 1-D stream of token ids.  # (tokens,)
        config: Window length, stride and token budget.
        batch_size: Windows per forward pass.
        progress: Show a tqdm progress bar.

    Returns:
        The perplexity, mean NLL and number of scored tokens.

    Raises:
        DataError: The stream is not 1-D or has fewer than two tokens.
    """
    if token_ids.dim() != 1:
        raise DataError(f"perplexity needs a 1-D token stream, got shape {tuple(token_ids.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if config.max_tokens is not None:
        token_ids = token_ids[: config.max_tokens]
    if token_ids.numel() < 2:
        raise DataError(f"perplexity needs at least 2 tokens, got {token_ids.numel()}")
    token_ids = token_ids.long()
    windows = sliding_windows(token_ids.numel(), config.context, config.stride)
    total, count = 0.0, 0
    with torch.inference_mode(), tqdm(total=len(windows), desc="perplexity", unit="win", disable=not progress) as bar:
        for batch in _batches_by_length(windows, batch_size):
            batch_total, batch_count = _batch_nll(model, token_ids, batch)
            total += batch_total
            count += batch_count
            bar.update(len(batch))
    nll = total / count
    return PerplexityResult(
        ppl=_exp(nll),
        nll=nll,
        tokens=count,
        context=config.context,
        stride=config.stride,
    )
