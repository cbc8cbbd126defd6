"""GPTQ: second-order weight rounding with error feedback (Frantar et al., 2023, arXiv:2210.17323).

Pure tensor math, no modules: :func:`accumulate_hessian` folds calibration inputs of one layer
into ``H = 2/n * X^T X`` (fp32), and :func:`gptq_quantize` rounds a weight column by column,
spreading each column's rounding error onto the columns not yet quantized through the
Cholesky factor of ``H^-1`` (Algorithm 1 of the paper, with lazy block updates).

Activation ordering (``act_order``) quantizes columns by decreasing ``diag(H)``. Combined with
groups, the group of a column is always its *original* position, and every group's scale and
zero point are fixed from the weight before any update ("static groups"), so the result is a
plain group-wise weight: no column permutation or ``g_idx`` has to be stored, and every reader
of the artifact format computes the same weight.

Example:
    >>> H = torch.zeros(64, 64); n = 0
    >>> H, n = accumulate_hessian(H, n, torch.randn(512, 64))
    >>> result = gptq_quantize(torch.randn(32, 64), H, WeightScheme(4, PerGroup(32)))
    >>> result.qweight.qweight.shape
    torch.Size([32, 64])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .primitives import QuantizedWeight, compute_qparams
from .scheme import PerGroup, WeightScheme


@dataclass(frozen=True)
class GPTQResult:
    """A GPTQ-rounded weight and its proxy loss ``sum_i err_i^2 / [H^-1]_ii / 2`` (paper eq. 2)."""

    qweight: QuantizedWeight
    loss: float


def accumulate_hessian(
    hessian: torch.Tensor, count: float, x: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """Fold inputs ``x`` ``[..., in]`` into the running ``H = 2/n sum_i w_i x_i x_i^T`` (fp32).

    Args:
        hessian: ``[in, in]`` fp32 running Hessian over a total row weight ``count`` so far.
        count: total row weight already folded in (the number of rows when unweighted).
        x: new inputs; every leading dimension is a row (a token).
        weights: optional per-row weights ``(rows,)`` (default 1).

    Returns:
        ``(hessian, count)`` updated in place and returned.
    """
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    if weights is None:
        n = float(x.shape[0])
    else:
        weights = weights.reshape(-1).to(torch.float32)
        n = float(weights.sum())
        x = x * weights.sqrt().unsqueeze(1)
    if n == 0:
        return hessian, count
    total = count + n
    hessian.mul_(count / total)
    x = x * (2.0 / total) ** 0.5
    hessian.addmm_(x.t(), x)
    return hessian, total


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, raising the damping if needed."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = float(torch.diag(hessian).mean())
    for attempt in range(6):
        lam = damp * (10**attempt) * mean_diag
        chol, info = torch.linalg.cholesky_ex(hessian + lam * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise torch.linalg.LinAlgError("Hessian is not positive definite even with 1e5x damping")


def _qparams_for(columns: torch.Tensor, scheme: WeightScheme, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero) ``[out, 1]`` for one group of columns ``[out, width]``.

    With ``mse`` the range is shrunk by the factor in ``1, 0.99, ..., 0.8`` that minimises
    ``sum |w - Q(w)|^2.4`` per row (the reference GPTQ quantizer's ``mse`` option).
    """
    group_scheme = WeightScheme(scheme.bits, PerGroup(max(2, columns.shape[1])), scheme.symmetric)
    scale, zero = compute_qparams(columns, group_scheme)
    scale, zero = scale[:, :1], (zero[:, :1] if zero is not None else None)
    if not mse:
        return scale, zero
    cols = columns.float()
    best = _group_error(cols, scale, zero, scheme)
    for i in range(1, 21):
        s, z = compute_qparams(cols * (1 - i / 100), group_scheme)
        s, z = s[:, :1], (z[:, :1] if z is not None else None)
        err = _group_error(cols, s, z, scheme)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better.unsqueeze(1), s, scale)
        if zero is not None:
            zero = torch.where(better.unsqueeze(1), z, zero)
    return scale, zero


def _group_error(cols: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: WeightScheme) -> torch.Tensor:
    """``sum |w - Q(w)|^2.4`` per row of one group ``[out, width]``."""
    _, dq = _round_column(cols, scale, zero, scheme)
    return (dq - cols).abs().pow(2.4).sum(dim=1)


def static_qparams(W: torch.Tensor, scheme: WeightScheme, mse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero) ``[out, groups]`` of every group of ``W``, fixed before any update."""
    if not mse:
        return compute_qparams(W, scheme)
    in_features = W.shape[1]
    width = scheme.granularity.group_width(in_features)
    parts = [_qparams_for(W[:, g0 : g0 + width], scheme, mse=True) for g0 in range(0, in_features, width)]
    scale = torch.cat([p[0] for p in parts], dim=1)
    zero = torch.cat([p[1] for p in parts], dim=1) if parts[0][1] is not None else None
    return scale, zero


def _round_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: WeightScheme):
    """Integer and dequantized values of ``w`` (a column ``[out]`` or a group ``[out, width]``)."""
    q = torch.round(w / scale)
    if zero is not None:
        q = q + zero.float()
    q = q.clamp(scheme.qmin, scheme.qmax)
    dq = (q - zero.float()) * scale if zero is not None else q * scale
    return q, dq


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: WeightScheme,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    mse_scales: bool = True,
) -> GPTQResult:
    """Quantize ``weight`` ``[out, in]`` with GPTQ against the Hessian of its inputs.

    Args:
        weight: the layer weight (any float dtype; computed in fp32).
        hessian: ``[in, in]`` from :func:`accumulate_hessian`.
        scheme: bits, granularity (per-channel or per-group, ragged last group allowed), symmetry.
        damp: relative damping ``lambda = damp * mean(diag H)`` (paper sec. 4, "percdamp").
        block_size: columns per lazy-update block; rounded up to a multiple of the group size.
        act_order: quantize columns in order of decreasing ``diag(H)`` (static groups, see module doc).
        mse_scales: choose each group's range by a shrink search on ``|w - Q(w)|^2.4`` instead of min/max.

    Returns:
        :class:`GPTQResult` with a :class:`QuantizedWeight` in ``scheme`` (original column order).
    """
    out_features, in_features = weight.shape
    W, H = _zero_dead_columns(weight, hessian)  # (out, in), (in, in)
    width = scheme.granularity.group_width(in_features)
    groups = scheme.granularity.num_groups(in_features)
    grouped = groups > 1
    # Per-channel, and act-order with groups: every scale is fixed up front from W.
    grid = _initial_grid(W, scheme, width, groups, static=not grouped or act_order, mse=mse_scales)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_features, device=W.device)
    W = W[:, perm]
    H = H[perm][:, perm]
    Hinv = _inverse_cholesky(H, damp)  # upper, (in, in)

    if grouped:
        block_size = max(width, -(-block_size // width) * width)
    Q = torch.zeros_like(W)
    losses = torch.zeros(out_features, dtype=torch.float32, device=W.device)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        Q1, Err1 = _quantize_block(W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2], perm[i1:i2], grid, losses)
        Q[:, i1:i2] = Q1
        # lazy batch update: the block's accumulated error reaches the remaining columns at once
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inverse = torch.argsort(perm)
    qweight = Q[:, inverse].to(torch.int8)
    qw = QuantizedWeight(qweight=qweight, scale=grid.scale, zero=grid.zero, scheme=scheme)
    return GPTQResult(qweight=qw, loss=float(losses.sum()))


@dataclass(frozen=True)
class _Grid:
    """The quantization grid GPTQ fills: per-group scale (and zero) ``(out, groups)``, written in place."""

    scheme: WeightScheme
    width: int  # columns per group (the last may be shorter)
    scale: torch.Tensor
    zero: torch.Tensor | None
    static: bool  # every group's scale fixed up front; otherwise set when the group's first column comes
    mse: bool


def _zero_dead_columns(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 copies of ``weight`` and ``hessian``; inputs that never fire get ``H_ii = 1`` and a zero weight."""
    W = weight.detach().to(torch.float32).clone()  # (out, in)
    H = hessian.detach().to(torch.float32, copy=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H


def _initial_grid(W: torch.Tensor, scheme: WeightScheme, width: int, groups: int, *, static: bool, mse: bool) -> _Grid:
    """Static grids get every scale from ``W`` now; dynamic ones get empty tensors to fill."""
    out_features = W.shape[0]
    if static:
        scale, zero = static_qparams(W, scheme, mse)  # (out, groups)
    else:
        scale = torch.empty(out_features, groups, dtype=torch.float32, device=W.device)
        zero = torch.empty(out_features, groups, dtype=torch.int8, device=W.device) if not scheme.symmetric else None
    return _Grid(scheme, width, scale, zero, static, mse)


def _column_qparams(grid: _Grid, W1: torch.Tensor, i: int, col: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero) ``(out,)`` of original column ``col``, at position ``i`` of the block ``W1``."""
    g = col // grid.width
    if not grid.static and col % grid.width == 0:
        # group g starts here (no permutation): its columns are W1[:, i:i+width], all in this block
        s, z = _qparams_for(W1[:, i : i + grid.width], grid.scheme, mse=grid.mse)
        grid.scale[:, g : g + 1] = s
        if grid.zero is not None:
            grid.zero[:, g : g + 1] = z
    return grid.scale[:, g], (grid.zero[:, g] if grid.zero is not None else None)


def _quantize_block(
    W1: torch.Tensor, Hinv1: torch.Tensor, cols: torch.Tensor, grid: _Grid, losses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round the block ``W1`` ``(out, b)`` column by column, each error fed back onto the block's later
    columns through ``Hinv1`` ``(b, b)`` (Algorithm 1, inner loop); ``losses`` ``(out,)`` grows in place.

    Returns:
        ``(Q1, Err1)``: the integer columns and the scaled errors ``(w - Q(w)) / [H^-1]_ii``, ``(out, b)``.
    """
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    for i in range(W1.shape[1]):
        s, z = _column_qparams(grid, W1, i, int(cols[i]))
        w = W1[:, i]
        q, dq = _round_column(w, s, z, grid.scheme)
        Q1[:, i] = q
        d = Hinv1[i, i]
        err = (w - dq) / d
        losses += (w - dq) ** 2 / d**2 / 2
        W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    return Q1, Err1
