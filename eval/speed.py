"""Prefill and decode throughput with a KV cache, measured the same way for torch and ONNX Runtime.

Both kinds of model are driven through :class:`CachedLM`: ``prefill(input_ids)`` runs the prompt
with an empty cache and keeps the cache; ``decode(next_ids)`` adds one token per row. Prefill
tokens/s is ``batch * prompt / seconds`` of one prefill; decode tokens/s is ``batch * steps /
seconds`` of the steps after it. The median of ``repeats`` timed runs (after ``warmup`` untimed ones)
is reported.

Example:
    >>> speed = measure_speed(TorchCachedLM(model), SpeedConfig(batch=1, prompt_len=128, new_tokens=32))
    >>> speed.prefill_tokens_per_s, speed.decode_tokens_per_s
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class CachedLM(Protocol):
    """A causal LM that keeps its own KV cache between calls."""

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Prompt ``[batch, seq]`` with an empty cache; returns last logits ``[batch, vocab]``."""

    def decode(self, next_ids: torch.Tensor) -> torch.Tensor:
        """One token per row ``[batch]``; returns its logits ``[batch, vocab]``."""


class TorchCachedLM:
    """A transformers causal LM driven through :class:`CachedLM` (``DynamicCache``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self._cache = None
        self._mask: torch.Tensor | None = None

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        self._cache = DynamicCache(config=self.model.config)
        self._mask = torch.ones_like(input_ids)
        out = self.model(input_ids=input_ids, attention_mask=self._mask, past_key_values=self._cache, use_cache=True)
        return out.logits[:, -1].float()

    @torch.no_grad()
    def decode(self, next_ids: torch.Tensor) -> torch.Tensor:
        if self._cache is None:
            raise RuntimeError("decode() before prefill()")
        self._mask = torch.cat([self._mask, torch.ones(self._mask.shape[0], 1, dtype=self._mask.dtype)], dim=1)
        out = self.model(input_ids=next_ids.reshape(-1, 1), attention_mask=self._mask,
                         past_key_values=self._cache, use_cache=True)
        return out.logits[:, -1].float()


@dataclass(frozen=True)
class SpeedConfig:
    """Shape and repetitions of a speed measurement.

    Attributes:
        batch / prompt_len: prefill shape.
        new_tokens: decode steps after the prefill.
        repeats: timed runs (the median is reported); warmup: untimed runs before them.
        seed: seed of the random prompt.
    """

    batch: int = 1
    prompt_len: int = 128
    new_tokens: int = 32
    repeats: int = 5
    warmup: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch", "prompt_len", "new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class SpeedResult:
    """Median throughput over the timed runs."""

    batch: int
    prompt_len: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def _one_run(lm: CachedLM, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    started = time.perf_counter()
    logits = lm.prefill(prompt)
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(new_tokens):
        logits = lm.decode(logits.argmax(-1))
    return prefill, time.perf_counter() - started


def measure_speed(lm: CachedLM, config: SpeedConfig, vocab_size: int) -> SpeedResult:
    """Time ``config.repeats`` prefill + greedy decode runs of ``lm`` on a random prompt.

    Args:
        lm: torch (:class:`TorchCachedLM`) or ONNX Runtime (``dsq.export.OrtCausalLM``) model.
        config: :class:`SpeedConfig`.
        vocab_size: range of the random prompt's token ids.

    Returns:
        The median :class:`SpeedResult`.
    """
    gen = torch.Generator().manual_seed(config.seed)
    prompt = torch.randint(0, vocab_size, (config.batch, config.prompt_len), generator=gen)
    for _ in range(config.warmup):
        _one_run(lm, prompt, min(config.new_tokens, 4))
    runs = [_one_run(lm, prompt, config.new_tokens) for _ in range(config.repeats)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    tokens = config.batch * config.prompt_len
    return SpeedResult(
        batch=config.batch, prompt_len=config.prompt_len, new_tokens=config.new_tokens,
        prefill_seconds=prefill, decode_seconds=decode,
        prefill_tokens_per_s=tokens / prefill, decode_tokens_per_s=config.batch * config.new_tokens / decode,
    )
