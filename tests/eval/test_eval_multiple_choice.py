"""Multiple-choice scoring: lm-eval tokenization, planted answers, acc vs acc_norm, padding."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

from dsq.tools.testing import byte_bpe_tokenizer, tiny_llama
from dsq.eval.data import MCItem
from dsq.eval.multiple_choice import _requests, _score_batch, encode_pair, multiple_choice


def _tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE; ``vocab_size=259`` learns no merges (one token per byte)."""
    return byte_bpe_tokenizer(["the answer is yes. the answer is no. " * 30], vocab_size)


class FixedDistribution(nn.Module):
    """A stand-in LM predicting the same next-token logits at every position."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)  # (vocab,)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        batch, seq = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(batch, seq, -1))  # (batch, seq, vocab)


def _favouring(tokenizer: PreTrainedTokenizerFast, scores: dict[str, float]) -> FixedDistribution:
    logits = torch.full((len(tokenizer),), -1e4)
    for text, score in scores.items():
        (token,) = tokenizer(text, add_special_tokens=False)["input_ids"]
        logits[token] = score
    return FixedDistribution(logits)


def test_encode_pair_moves_trailing_space_and_keeps_boundary_merges() -> None:
    tokenizer = _tokenizer(300)
    whole = tokenizer("the answer is yes", add_special_tokens=False)["input_ids"]
    context, continuation = encode_pair(tokenizer, "the answer is ", "yes")
    assert context == tokenizer("the answer is", add_special_tokens=False)["input_ids"]
    assert context + continuation == whole
    assert tokenizer.decode(continuation) == " yes"


def test_planted_answer_is_chosen() -> None:
    tokenizer = _tokenizer(259)
    model = _favouring(tokenizer, {"b": 5.0, "a": 0.0, "c": 0.0})
    items = [
        MCItem(context="pick:", choices=("a", "b", "c"), gold=1),
        MCItem(context="pick:", choices=("b", "c"), gold=0),
        MCItem(context="pick:", choices=("a", "c", "b"), gold=0),
    ]
    result = multiple_choice(model, tokenizer, items, progress=False)
    assert result.n == 3
    assert result.acc == pytest.approx(2 / 3)


def test_acc_norm_divides_by_choice_bytes() -> None:
    tokenizer = _tokenizer(259)
    model = _favouring(tokenizer, {"x": 0.0, "y": 2.0})
    # log p(x) ~ -2.13, log p(y) ~ -0.13: "x" has the larger sum, "y" * 20 the larger per-byte score.
    items = [MCItem(context="q", choices=("x", "y" * 20), gold=1)]
    result = multiple_choice(model, tokenizer, items, progress=False)
    assert (result.acc, result.acc_norm) == (0.0, 1.0)


def test_right_padding_does_not_change_scores() -> None:
    tokenizer = _tokenizer(300)
    model = tiny_llama(len(tokenizer))
    items = [
        MCItem(context="the answer is", choices=(" yes", " no", " the answer is no"), gold=0),
        MCItem(context="is the answer yes? ", choices=("no", "yes, the answer is yes"), gold=1),
    ]
    requests = _requests(tokenizer, items, add_bos=True, max_length=None)
    with torch.inference_mode():
        batched = _score_batch(model, requests, pad_id=tokenizer.pad_token_id)
        alone = [_score_batch(model, [request], pad_id=tokenizer.pad_token_id)[0] for request in requests]
    assert batched == pytest.approx(alone, abs=1e-4)
    one = multiple_choice(model, tokenizer, items, progress=False, batch_size=1)
    many = multiple_choice(model, tokenizer, items, progress=False, batch_size=16)
    assert one == many
