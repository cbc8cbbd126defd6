"""Throughput measurement drives the model through its KV cache and computes the right logits."""
from __future__ import annotations

import pytest
import torch

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
    assert result.prefill_tokens_per_s == pytest.approx(16 / result.prefill_seconds)
    assert result.decode_tokens_per_s == pytest.approx(10 / result.decode_seconds)


def test_speed_config_rejects_empty_runs():
    with pytest.raises(ValueError, match="new_tokens must be >= 1"):
        SpeedConfig(new_tokens=0)
