"""How far one model drifts from another on the same token windows: top-1 agreement, KL, perplexity.

Used to measure a merged LoRA model against the adapter model it came from.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dsq.core.errors import DataError
from dsq.eval.fidelity import fidelity_windows
from dsq.eval.perplexity import PerplexityConfig, perplexity
from dsq.quantize.bnb import cpu_bf16_kernel_off


@dataclass(frozen=True)
class MergeDrift:
    """How far the merged model is from the adapter model it came from.

    Attributes:
        top1_agreement: fraction of scored positions where both models' argmax next token match.
        mean_kl: mean KL(adapter || merged) per position, in nats.
        ppl_adapter: perplexity of the adapter model (:func:`dsq.eval.perplexity.perplexity`,
            disjoint windows of ``seq_len``).
        ppl_merged: perplexity of the merged model on the same windows.
        ppl_increase_pct: ``100 * (ppl_merged / ppl_adapter - 1)``.
        max_abs_logit_diff: largest ``|logit_merged - logit_adapter|`` over positions and vocabulary.
        tokens: number of compared positions.
    """

    top1_agreement: float
    mean_kl: float
    ppl_adapter: float
    ppl_merged: float
    ppl_increase_pct: float
    max_abs_logit_diff: float
    tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _logits(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    return model(input_ids=windows, attention_mask=torch.ones_like(windows)).logits.float()  # (batch, seq, vocab)


class _EvalMode:
    """Put models in eval mode for the block and restore each module's training flag afterwards."""

    def __init__(self, *models: nn.Module) -> None:
        self.models = models
        self.flags: list[list[tuple[nn.Module, bool]]] = []

    def __enter__(self) -> None:
        self.flags = [[(m, m.training) for m in model.modules()] for model in self.models]
        for model in self.models:
            model.eval()

    def __exit__(self, *exc: object) -> None:
        for flags in self.flags:
            for module, training in flags:
                module.training = training


def _compare_logits(
    adapter_model: nn.Module, merged_model: nn.Module, windows: torch.Tensor, batch_size: int
) -> tuple[float, float, float, int]:
    """(top-1 agreement, mean KL, max |logit diff|, positions) over ``windows`` ``(n, seq)``."""
    agree, kl_sum, max_diff = 0, 0.0, 0.0
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size]  # (b, seq)
            ref, cand = _logits(adapter_model, batch), _logits(merged_model, batch)  # (b, seq, vocab)
            if ref.shape != cand.shape:
                raise DataError(
                    f"adapter and merged models give logits of shapes {tuple(ref.shape)} and {tuple(cand.shape)}"
                )
            max_diff = max(max_diff, float((ref - cand).abs().max()))
            lp_ref, lp_cand = torch.log_softmax(ref, dim=-1), torch.log_softmax(cand, dim=-1)
            agree += int((lp_ref.argmax(-1) == lp_cand.argmax(-1)).sum())
            kl_sum += float(_kl(lp_ref, lp_cand).double().sum())
    return agree / windows.numel(), kl_sum / windows.numel(), max_diff, windows.numel()


def measure_merge_drift(
    adapter_model: nn.Module,
    merged_model: nn.Module,
    token_ids: torch.Tensor,
    seq_len: int = 128,
    max_tokens: int = 4096,
    *,
    batch_size: int = 4,
) -> MergeDrift:
    """Compare a merged model with the adapter model it was merged from, on the same windows.

    Top-1 agreement, KL and the largest logit difference are taken on the non-overlapping windows
    of :func:`dsq.eval.fidelity.fidelity_windows`; perplexity with
    :func:`dsq.eval.perplexity.perplexity` (``context = stride = seq_len``) on the same tokens. Both
    models run in eval mode (their training flags are restored afterwards) and their bitsandbytes
    4-bit layers on the dequantize path (:func:`dsq.quantize.bnb.cpu_bf16_kernel_off`), so the drift
    is the merge's on every CPU, not the difference between bitsandbytes' CPU kernels, and no layer
    is repacked before the merged model is saved.

    Args:
        adapter_model: the LoRA model (a deepcopy taken before merging).
        merged_model: the result of :func:`merge_into_fp` / :func:`merge_requantize`.
        token_ids: 1-D held-out token stream.  # (tokens,)
        seq_len: window length.
        max_tokens: use only the first ``max_tokens`` tokens.
        batch_size: windows per forward pass.

    Returns:
        A :class:`MergeDrift`.

    Raises:
        DataError: the stream is empty or not 1-D, or the models' vocabularies differ.
    """
    windows = fidelity_windows(token_ids, seq_len, max_tokens)  # (n_windows, seq)
    stream = token_ids[:max_tokens].long()
    config = PerplexityConfig(context=seq_len, stride=seq_len, max_tokens=max_tokens)
    with _EvalMode(adapter_model, merged_model), cpu_bf16_kernel_off(adapter_model, merged_model):
        top1, mean_kl, max_diff, positions = _compare_logits(adapter_model, merged_model, windows, batch_size)
        ppl_a = perplexity(adapter_model, stream, config, batch_size=batch_size, progress=False).ppl
        ppl_m = perplexity(merged_model, stream, config, batch_size=batch_size, progress=False).ppl
    increase = 100.0 * (ppl_m / ppl_a - 1.0) if math.isfinite(ppl_a) and ppl_a > 0 else math.nan
    return MergeDrift(top1, mean_kl, ppl_a, ppl_m, increase, max_diff, positions)


def _kl(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """KL(ref || cand) per position from float32 log-probs ``(..., vocab)``; p_ref == 0 terms count 0."""
    p_ref = reference.exp()
    terms = torch.where(p_ref > 0, p_ref * (reference - candidate), torch.zeros_like(p_ref))
    return terms.sum(dim=-1)
