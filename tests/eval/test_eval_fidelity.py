"""Fidelity: top-1 agreement and KL(original || candidate)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
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


class TableModel(nn.Module):
    """A causal LM stand-in whose next-token logits depend only on the current token: ``table[id]``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table  # (vocab, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])  # (batch, seq, vocab)


def test_kl_is_original_to_candidate_in_nats() -> None:
    """Hand-made distributions where KL(p || q) and KL(q || p) differ: the report's KL is KL(original || candidate)."""
    original = torch.tensor([
        [6.0, 0.0, 0.0, 0.0],  # peaked on 0
        [0.0, 3.0, 1.0, -2.0],
        [-1.0, -1.0, 5.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],  # uniform
    ])  # (vocab, vocab): logits after token i
    candidate = torch.tensor([
        [0.0, 0.0, 0.0, 0.0],  # uniform: KL(p || q) = 1.33 nats, KL(q || p) = 3.12
        [0.0, 3.0, 1.0, -2.0],  # same as the original: KL 0
        [2.0, -1.0, 3.0, 0.0],  # same argmax, different shape
        [0.0, 0.0, 0.0, 4.0],  # peaked on 3
    ])
    token_ids = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 0, 3, 2, 2])
    reference = reference_logprobs(TableModel(original), token_ids, seq_len=4, max_tokens=12)
    result = compare_to_reference(TableModel(candidate), reference, batch_size=2)

    log_p = torch.log_softmax(original[token_ids], dim=-1)  # (tokens, vocab)
    log_q = torch.log_softmax(candidate[token_ids], dim=-1)
    # kl_div(input=log q, target=p) = sum_v p (log p - log q) = KL(p || q)
    forward = F.kl_div(log_q, log_p.exp(), reduction="none").sum(-1)  # (tokens,)
    reverse = F.kl_div(log_p, log_q.exp(), reduction="none").sum(-1)
    assert reverse.mean().item() > forward.mean().item() + 0.4  # 1.40 vs 0.86 nats: the directions differ clearly
    assert result.tokens == 12
    assert result.mean_kl == pytest.approx(forward.mean().item(), rel=1e-5)
    assert result.max_kl == pytest.approx(forward.max().item(), rel=1e-5)
    assert result.mean_kl != pytest.approx(reverse.mean().item(), rel=0.1)
    assert result.max_kl != pytest.approx(reverse.max().item(), rel=0.1)
    # argmax differs only after token 3 (uniform original: its argmax is token 0; candidate: 3)
    assert result.top1_agreement == pytest.approx(1 - int((token_ids == 3).sum()) / 12)
