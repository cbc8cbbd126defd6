"""SmoothQuant: migrate activation outliers into the weights before W8A8 (Xiao et al., 2023, arXiv:2211.10438).

Pure tensor math, no modules and no calibration loop. For the input channels ``j`` of a group of
Linears that read the same activation ``X`` (e.g. q/k/v after the attention norm), eq. 4 of the
paper picks per-channel factors

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

and rewrites ``Y = X W^T`` as ``(X diag(s)^-1) (W diag(s))^T``: the op that produces ``X`` (a norm's
weight, or the output rows of the previous Linear) divides by ``s``, and every consumer's input
column ``j`` multiplies by ``s_j``. The model's fp function is unchanged; the activation's outlier
channels shrink, so per-token / per-tensor int8 activation quantization loses less.

Example:
    >>> s = smoothing_factors(act_absmax, [q.weight, k.weight, v.weight], alpha=0.5)
    >>> fold_smoothing(s, prev_scale=norm.weight, consumers=[q.weight, k.weight, v.weight])
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


def _as_list(t: torch.Tensor | Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [t]
    return list(t)


@torch.no_grad()
def fold_smoothing(
    s: torch.Tensor,
    *,
    prev_scale: torch.Tensor | None = None,
    prev_rows: torch.Tensor | Sequence[torch.Tensor] | None = None,
    consumers: Sequence[torch.Tensor],
) -> None:
    """Fold smoothing factors into a model in place; its fp function is unchanged.

    Args:
        s: ``[C]`` factors from :func:`smoothing_factors`.
        prev_scale: ``[C]`` elementwise scale of the op producing the activation (an RMSNorm /
            LayerNorm weight); divided by ``s``. (A LayerNorm's bias is ``[C]`` too: pass it here as
            well via ``prev_rows``.)
        prev_rows: tensor(s) whose dim 0 indexes the produced channels, divided by ``s`` along it:
            the previous Linear's weight ``[C, in]`` and bias ``[C]`` (e.g. ``v_proj`` before
            ``o_proj``, ``up_proj`` before ``down_proj``).
        consumers: weights ``[..., out, C]`` reading the activation; column ``j`` is multiplied by ``s_j``.

    Each tensor is updated in fp32 and written back in its own dtype.

    Raises:
        ValueError: no producer given, no consumer, or a shape that does not match ``C``.
    """
    s = s.detach().float().reshape(-1)
    channels = s.numel()
    rows = _as_list(prev_rows)
    if prev_scale is None and not rows:
        raise ValueError("fold_smoothing needs the producing op: prev_scale (a norm weight) and/or prev_rows")
    if not consumers:
        raise ValueError("fold_smoothing needs at least one consumer weight")
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError("smoothing factors must be finite and positive")
    if prev_scale is not None:
        if prev_scale.shape != (channels,):
            raise ValueError(f"prev_scale must be [{channels}], got {tuple(prev_scale.shape)}")
        prev_scale.copy_((prev_scale.float() / s.to(prev_scale.device)).to(prev_scale.dtype))
    for r in rows:
        if r.shape[0] != channels:
            raise ValueError(f"prev_rows tensor must have {channels} rows (dim 0), got {tuple(r.shape)}")
        view = s.to(r.device).reshape(channels, *([1] * (r.dim() - 1)))
        r.copy_((r.float() / view).to(r.dtype))
    for w in consumers:
        if w.shape[-1] != channels:
            raise ValueError(f"consumer weight must have {channels} input columns, got {tuple(w.shape)}")
        w.copy_((w.float() * s.to(w.device)).to(w.dtype))


__all__ = ["fold_smoothing", "smoothing_factors"]
