"""SmoothQuant: migrate activation outliers into the weights before W8A8 (Xiao et al., 2023, arXiv:2211.10438).

Pure tensor math, no modules and no calibration loop. For the input channels ``j`` of a group of
Linears that read the same activation ``X`` (e.g. q/k/v after the attention norm), eq. 4 of the
paper picks per-channel factors

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

and rewrites ``Y = X W^T`` as ``(X diag(s)^-1) (W diag(s))^T``: the op that produces ``X`` (a norm's
weight, or the output rows of the previous Linear) divides by ``s``, and every consumer's input
column ``j`` multiplies by ``s_j`` (folded by :func:`dsq.quantize.mappings.fold`, the same table
AWQ uses). The model's fp function is unchanged; the activation's outlier channels shrink, so
per-token / per-tensor int8 activation quantization loses less.

Example:
    >>> s = smoothing_factors(act_absmax, [q.weight, k.weight, v.weight], alpha=0.5)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

# Factors are clamped to [1/S_MAX, S_MAX]: beyond that the fold itself would push a weight or a
# norm entry toward fp16/bf16 overflow or underflow for no quantization gain.
S_MAX = 1e4


def smoothing_factors(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per-input-channel smoothing factors ``s`` (paper eq. 4), fp32 ``[C]``.

    Args:
        act_absmax: ``[C]`` max |activation| per input channel over the calibration tokens.
        weights: every weight reading these channels, each ``[..., out, C]`` (a Linear's
            ``[out, C]`` or fused experts' ``[E, out, C]``); ``max|W_j|`` is over all of them.
        alpha: migration strength in ``[0, 1]`` (0: no activation change; 0.5 balances; the paper
            uses 0.5 for most models, up to 0.75-0.85 for ones with large outliers).

    Returns:
        ``s`` fp32 ``[C]``: finite, positive, clamped to ``[1e-4, 1e4]``. A channel whose
        activation or weight column is all zero gets ``s = 1`` (nothing to balance).

    Raises:
        ValueError: bad ``alpha``, no weights, mismatched channel counts, or non-finite statistics.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not weights:
        raise ValueError("smoothing_factors needs at least one consumer weight")
    a = act_absmax.detach().float().reshape(-1)
    channels = a.numel()
    if not torch.isfinite(a).all() or (a < 0).any():
        raise ValueError("activation absmax has NaN, inf or negative entries")
    w_max = torch.zeros(channels, dtype=torch.float32, device=a.device)
    for i, w in enumerate(weights):
        if w.shape[-1] != channels:
            raise ValueError(f"weight {i} has {w.shape[-1]} input channels, activation absmax has {channels}")
        col = w.detach().float().abs().reshape(-1, channels).amax(dim=0).to(a.device)  # (C,)
        w_max = torch.maximum(w_max, col)
    if not torch.isfinite(w_max).all():
        raise ValueError("a consumer weight has NaN or inf entries")
    live = (a > 0) & (w_max > 0)
    s = torch.ones_like(a)
    s[live] = a[live].pow(alpha) / w_max[live].pow(1.0 - alpha)
    return s.clamp(1.0 / S_MAX, S_MAX)


__all__ = ["smoothing_factors"]
