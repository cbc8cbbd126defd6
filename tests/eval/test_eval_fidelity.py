"""Fidelity: top-1 agreement and KL(original || candidate)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from dsq.eval.fidelity import compare_to_reference, fidelity_windows, reference_logprobs

VOCAB = 300


@pytest.fixture(scope="module")
def token_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (150,), generator=torch.Generator().manual_seed(4))


def test_windows_are_non_overlapping_and_deterministic(token_ids: torch.Tensor) -> None:
    windows = fidelity_windows(token_ids, seq_len=32, max_tokens=100)
    assert windows.shape == (3, 32)
    assert torch.equal(windows.flatten(), token_ids[:96])
    assert fidelity_windows(token_ids[:10], seq_len=32, max_tokens=100).shape == (1, 10)


def test_identical_model_agrees_fully(model: LlamaForCausalLM, token_ids: torch.Tensor) -> None:
    reference = reference_logprobs(model, token_ids, seq_len=32, max_tokens=128)
    assert reference.logprobs.shape == (4, 32, VOCAB) and reference.logprobs.dtype == torch.float32
    result = compare_to_reference(model, reference)
    assert result.tokens == 128
    assert result.top1_agreement == 1.0
    assert result.mean_kl == pytest.approx(0.0, abs=1e-6)
    assert result.max_kl == pytest.approx(0.0, abs=1e-6)


def test_perturbed_model_diverges(model: LlamaForCausalLM, token_ids: torch.Tensor) -> None:
    reference = reference_logprobs(model, token_ids, seq_len=32, max_tokens=128)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in perturbed.model.layers.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    result = compare_to_reference(perturbed, reference, batch_size=3)
    assert result.mean_kl > 1e-3
    assert result.max_kl >= result.mean_kl
    assert result.top1_agreement < 1.0


def test_half_precision_storage_stays_close(model: LlamaForCausalLM, token_ids: torch.Tensor) -> None:
    reference = reference_logprobs(model, token_ids, seq_len=32, max_tokens=64, dtype=torch.bfloat16)
    assert reference.logprobs.dtype == torch.bfloat16
    result = compare_to_reference(model, reference)
    assert result.top1_agreement == 1.0
    assert abs(result.mean_kl) < 1e-2
