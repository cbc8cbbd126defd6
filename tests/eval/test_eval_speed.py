"""Throughput measurement drives the model through its KV cache and computes the right logits."""
from __future__ import annotations

import pytest
import torch

from dsq.eval import speed
from dsq.eval.speed import SpeedConfig, TorchCachedLM, measure_speed
from dsq.tools.testing import tiny_llama


def test_cached_decoding_gives_the_full_forward_logits():
    model = tiny_llama(300)
    lm = TorchCachedLM(model)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = [lm.prefill(ids[:, :6])]
    for t in range(6, 9):
        logits.append(lm.decode(ids[:, t]))
    with torch.no_grad():
        full = model(input_ids=ids).logits  # (2, 9, vocab)
    torch.testing.assert_close(torch.stack(logits, 1), full[:, 5:9], atol=1e-5, rtol=1e-5)


def test_measure_speed_counts_tokens_per_second():
    calls = {"prefill": 0, "decode": 0}

    class Counting(TorchCachedLM):
        def prefill(self, input_ids):
            calls["prefill"] += 1
            return super().prefill(input_ids)

        def decode(self, next_ids):
            calls["decode"] += 1
            return super().decode(next_ids)

    config = SpeedConfig(batch=2, prompt_len=8, new_tokens=5, repeats=3, warmup=1)
    result = measure_speed(Counting(tiny_llama(300)), config, vocab_size=300)
    assert calls == {"prefill": 4, "decode": 4 + 3 * 5}  # warmup decodes min(new_tokens, 4)
    assert (result.batch, result.prompt_len, result.new_tokens) == (2, 8, 5)


class ScriptedClock:
    """``time.perf_counter`` that only moves when the scripted model below advances it."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class ScriptedLM:
    """A :class:`CachedLM` whose n-th prefill takes ``prefill[n]`` s and each decode step of run n ``step[n]`` s."""

    def __init__(self, clock: ScriptedClock, prefill: list[float], step: list[float]) -> None:
        self.clock, self.prefill_s, self.step_s, self.run = clock, prefill, step, -1

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.run += 1
        self.clock.now += self.prefill_s[self.run]
        return torch.zeros(input_ids.shape[0], 300)  # (batch, vocab)

    def decode(self, next_ids: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.step_s[self.run]
        return torch.zeros(next_ids.shape[0], 300)  # (batch, vocab)


def test_measure_speed_reports_the_median_timed_run_and_ignores_warmup(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = ScriptedClock()
    monkeypatch.setattr(speed, "time", clock)
    # run 0 is the warmup (100 s prefill, 50 s steps); timed prefills 3, 1, 2 s; timed decode runs 2.0, 0.5, 1.5 s
    lm = ScriptedLM(clock, prefill=[100.0, 3.0, 1.0, 2.0], step=[50.0, 0.4, 0.1, 0.3])
    result = measure_speed(lm, SpeedConfig(batch=2, prompt_len=8, new_tokens=5, repeats=3, warmup=1), vocab_size=300)
    assert result.prefill_seconds == pytest.approx(2.0)
    assert result.decode_seconds == pytest.approx(1.5)
    assert result.prefill_tokens_per_s == pytest.approx(2 * 8 / 2.0)
    assert result.decode_tokens_per_s == pytest.approx(2 * 5 / 1.5)


def test_speed_config_rejects_empty_runs():
    with pytest.raises(ValueError, match="new_tokens must be >= 1"):
        SpeedConfig(new_tokens=0)
