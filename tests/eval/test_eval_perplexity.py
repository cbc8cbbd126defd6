"""Sliding-window perplexity against a token-by-token brute force."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaForCausalLM

from dsq.core.errors import DataError, RecipeError
from dsq.eval.perplexity import PerplexityConfig, perplexity, sliding_windows

VOCAB = 300


def _brute_force_nll(model: LlamaForCausalLM, ids: torch.Tensor, context: int, stride: int) -> float:
    """Score each token alone, with exactly the left context its window gives it."""
    total = 0.0
    with torch.inference_mode():
        for target in range(1, ids.numel()):
            last_input = target - 1
            window = max(0, (last_input - context) // stride + 1)
            begin = window * stride
            logits = model(input_ids=ids[begin:target].unsqueeze(0)).logits[0, -1].double()  # (vocab,)
            total -= torch.log_softmax(logits, dim=-1)[ids[target]].item()
    return total / (ids.numel() - 1)


@pytest.mark.parametrize(("n_tokens", "context", "stride"), [(1000, 8, 8), (50, 16, 8), (100, 16, 5), (40, 64, 32)])
def test_windows_score_every_token_but_the_first_exactly_once(n_tokens: int, context: int, stride: int) -> None:
    scored: list[int] = []
    for window in sliding_windows(n_tokens, context, stride):
        assert window.length <= context
        scored += [window.begin + i + 1 for i in range(window.first_scored, window.length)]
        assert window.first_scored == 0 or window.length - window.first_scored <= stride
    assert scored == list(range(1, n_tokens))


@pytest.mark.parametrize(("context", "stride", "batch_size"), [(16, 8, 3), (16, 16, 8), (12, 5, 2), (12, 1, 16)])
def test_perplexity_matches_brute_force(model: LlamaForCausalLM, context: int, stride: int, batch_size: int) -> None:
    ids = torch.randint(0, VOCAB, (41,), generator=torch.Generator().manual_seed(1))
    result = perplexity(model, ids, PerplexityConfig(context=context, stride=stride), batch_size=batch_size, progress=False)
    expected = _brute_force_nll(model, ids, context, stride)
    assert result.tokens == 40 and (result.context, result.stride) == (context, stride)
    assert result.nll == pytest.approx(expected, rel=1e-4)
    assert result.ppl == pytest.approx(math.exp(expected), rel=1e-4)


def test_stride_equal_to_context_uses_disjoint_chunks_and_loses_no_token(model: LlamaForCausalLM) -> None:
    ids = torch.randint(0, VOCAB, (33,), generator=torch.Generator().manual_seed(2))
    result = perplexity(model, ids, PerplexityConfig(context=8, stride=8), progress=False)
    with torch.inference_mode():
        total = 0.0
        for begin in range(0, 32, 8):
            logits = model(input_ids=ids[begin : begin + 8].unsqueeze(0)).logits[0].float()  # (seq, vocab)
            targets = ids[begin + 1 : begin + 9]
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    assert result.tokens == 32
    assert result.nll == pytest.approx(total / 32, rel=1e-5)


def test_max_tokens_truncates_the_stream(model: LlamaForCausalLM) -> None:
    ids = torch.randint(0, VOCAB, (80,), generator=torch.Generator().manual_seed(3))
    short = perplexity(model, ids, PerplexityConfig(context=16, stride=8, max_tokens=40), progress=False)
    assert short.tokens == 39
    assert short.nll == pytest.approx(perplexity(model, ids[:40], PerplexityConfig(16, 8), progress=False).nll)


@pytest.mark.parametrize(("context", "stride"), [(8, 16), (0, 0), (8, 0)])
def test_config_validation(context: int, stride: int) -> None:
    with pytest.raises(RecipeError):
        PerplexityConfig(context=context, stride=stride)


def test_too_short_stream_is_a_data_error(model: LlamaForCausalLM) -> None:
    with pytest.raises(DataError):
        perplexity(model, torch.tensor([5]), PerplexityConfig(), progress=False)
