"""Fidelity of a compressed model to its original: next-token agreement and KL divergence.

The original model's next-token log-probabilities over fixed, non-overlapping windows of
held-out text are computed once (:func:`reference_logprobs`). A candidate is run on the
same windows and compared position by position (:func:`compare_to_reference`):

* top-1 agreement: fraction of positions where both models' most likely next token match;
* KL(original || candidate) = sum_v p_ref(v) * (log p_ref(v) - log p_cand(v)), in nats,
  computed in float32, averaged (``mean_kl``) and maximized (``max_kl``) over positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from dsq.core.errors import DataError


@dataclass(frozen=True, eq=False)
class ReferenceLogprobs:
    """The original model's next-token distributions over fixed windows.

    Attributes:
        windows: Token ids fed to the model.  # (n_windows, seq)
        logprobs: Log-softmax of the original's logits, stored in ``logprobs.dtype``
            (float32 by default; bfloat16/float16 halve the memory).  # (n_windows, seq, vocab)
        top1: The original's argmax token, taken from the float32 log-probs.  # (n_windows, seq)
    """

    windows: torch.Tensor
    logprobs: torch.Tensor
    top1: torch.Tensor

    @property
    def tokens(self) -> int:
        """Number of compared positions (``n_windows * seq``)."""
        return self.windows.numel()


@dataclass(frozen=True)
class FidelityResult:
    """How closely a candidate follows the original.

    Attributes:
        top1_agreement: Fraction of positions with the same argmax next token (0..1).
        mean_kl: Mean KL(original || candidate) per position, in nats.
        max_kl: Largest per-position KL, in nats.
        tokens: Number of compared positions.
    """

    top1_agreement: float
    mean_kl: float
    max_kl: float
    tokens: int


def fidelity_windows(token_ids: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Cut the first ``max_tokens`` tokens into non-overlapping windows of ``seq_len``.

    A trailing partial window is dropped; a stream shorter than ``seq_len`` gives one
    window holding the whole stream.

    Args:
        token_ids: 1-D token stream.  # (tokens,)
        seq_len: Window length.
        max_tokens: Token budget.

    Returns:
        The windows.  # (n_windows, seq)

    Raises:
        DataError: The stream is empty or not 1-D, or a length is not positive.
    """
    if seq_len <= 0 or max_tokens <= 0:
        raise DataError(f"fidelity seq_len and max_tokens must be positive, got {seq_len} and {max_tokens}")
    if token_ids.dim() != 1 or token_ids.numel() == 0:
        raise DataError(f"fidelity needs a non-empty 1-D token stream, got shape {tuple(token_ids.shape)}")
    tokens = token_ids[:max_tokens].long()
    n_windows = tokens.numel() // seq_len
    if n_windows == 0:
        return tokens.unsqueeze(0)  # (1, tokens)
    return tokens[: n_windows * seq_len].reshape(n_windows, seq_len)  # (n_windows, seq)


def _logits(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` on a batch of full windows, in the model's dtype."""
    return model(input_ids=windows, attention_mask=torch.ones_like(windows)).logits  # (batch, seq, vocab)


def _row_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Float32 log-softmax of one window's logits; done per window to bound memory."""
    return torch.log_softmax(logits.float(), dim=-1)  # (seq, vocab)


def reference_logprobs(
    model: nn.Module,
    token_ids: torch.Tensor,
    *,
    seq_len: int = 128,
    max_tokens: int = 4096,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 4,
    progress: bool = False,
) -> ReferenceLogprobs:
    """Run the original model once over fixed windows and keep its log-probabilities.

    Args:
        model: The original causal LM.
        token_ids: 1-D held-out token stream.  # (tokens,)
        seq_len: Window length.
        max_tokens: Use only the first ``max_tokens`` tokens.
        dtype: Storage dtype of the kept log-probs (``torch.float32``, ``torch.bfloat16``
            or ``torch.float16``). Memory is ``tokens * vocab * dtype size`` bytes.
        batch_size: Windows per forward pass.
        progress: Show a tqdm progress bar.

    Returns:
        The windows, stored log-probs and float32 argmax tokens.
    """
    windows = fidelity_windows(token_ids, seq_len, max_tokens)  # (n_windows, seq)
    n_windows, seq = windows.shape
    top1 = torch.empty((n_windows, seq), dtype=torch.long)  # (n_windows, seq)
    stored: torch.Tensor | None = None  # (n_windows, seq, vocab), allocated once the vocabulary is known
    with torch.inference_mode(), tqdm(total=n_windows, desc="reference", unit="win", disable=not progress) as bar:
        for start in range(0, n_windows, batch_size):
            logits = _logits(model, windows[start : start + batch_size])  # (batch, seq, vocab)
            if stored is None:
                stored = torch.empty((n_windows, seq, logits.shape[-1]), dtype=dtype)
            for offset in range(logits.shape[0]):
                logprobs = _row_logprobs(logits[offset])  # (seq, vocab)
                top1[start + offset] = logprobs.argmax(dim=-1)
                stored[start + offset] = logprobs.to(dtype)
            bar.update(logits.shape[0])
    assert stored is not None  # fidelity_windows returns at least one window
    return ReferenceLogprobs(windows=windows, logprobs=stored, top1=top1)


def _kl_per_position(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """KL(ref || cand) per position from float32 log-probs; terms with p_ref == 0 count as 0."""
    p_ref = reference.exp()  # (seq, vocab)
    terms = torch.where(p_ref > 0, p_ref * (reference - candidate), torch.zeros_like(p_ref))
    return terms.sum(dim=-1)  # (seq,)


def compare_to_reference(
    model: nn.Module,
    reference: ReferenceLogprobs,
    *,
    batch_size: int = 4,
    progress: bool = False,
) -> FidelityResult:
    """Compare a candidate's next-token distributions with the original's.

    Args:
        model: Candidate causal LM with the original's vocabulary.
        reference: Output of :func:`reference_logprobs` for the original model.
        batch_size: Windows per forward pass.
        progress: Show a tqdm progress bar.

    Returns:
        Top-1 agreement, mean and max KL(original || candidate), compared positions.

    Raises:
        DataError: The candidate's vocabulary size differs from the reference's.
    """
    windows = reference.windows  # (n_windows, seq)
    agree = 0
    kl_sum = 0.0
    kl_max = -math.inf
    with torch.inference_mode(), tqdm(total=windows.shape[0], desc="fidelity", unit="win", disable=not progress) as bar:
        for start in range(0, windows.shape[0], batch_size):
            logits = _logits(model, windows[start : start + batch_size])  # (batch, seq, vocab)
            if logits.shape[-1] != reference.logprobs.shape[-1]:
                raise DataError(
                    f"candidate vocabulary ({logits.shape[-1]}) differs from the original's "
                    f"({reference.logprobs.shape[-1]})"
                )
            for offset in range(logits.shape[0]):
                candidate = _row_logprobs(logits[offset])  # (seq, vocab)
                kl = _kl_per_position(reference.logprobs[start + offset].float(), candidate)  # (seq,)
                agree += int((candidate.argmax(dim=-1) == reference.top1[start + offset]).sum())
                kl_sum += kl.double().sum().item()
                row_max = kl.max().item()
                if math.isnan(row_max) or row_max > kl_max:  # a NaN, once seen, is kept
                    kl_max = row_max
            bar.update(logits.shape[0])
    tokens = reference.tokens
    return FidelityResult(
        top1_agreement=agree / tokens,
        mean_kl=kl_sum / tokens,
        max_kl=kl_max,
        tokens=tokens,
    )
