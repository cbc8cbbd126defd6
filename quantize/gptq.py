"""GPTQ: second-order weight rounding with error feedback (Frantar et al., 2023, arXiv:2210.17323).

Pure tensor math, no modules: given the Hessians ``H = 2/n * X^T X`` of the layers' inputs
(:class:`~.stats.InputStats` collects them), :func:`gptq_quantize_batched` rounds a stack of weights
``[B, out, in]`` column by column, spreading each column's rounding error onto the columns not
yet quantized through the Cholesky factor of ``H^-1`` (Algorithm 1 of the paper, with lazy block
updates). Every step is batched over ``B`` (the experts of one fused projection, the groups of a
grouped Linear, same-shape Linears of a layer): the Python loop over columns runs once for the
whole stack instead of once per weight. Each weight's integers do not depend on what it is
stacked with (LAPACK factors each matrix on its own, the batched matmuls reduce each matrix in
the same order), so :func:`gptq_quantize`, one weight, is the batch of one.

Activation ordering (``act_order``) quantizes columns by decreasing ``diag(H)``. Combined with
groups, the group of a column is always its *original* position, and every group's scale and
zero point are fixed from the weight before any update ("static groups"), so the result is a
plain group-wise weight: no column permutation or ``g_idx`` has to be stored, and every reader
of the artifact format computes the same weight.

Example:
    >>> x = torch.randn(512, 64)
    >>> H = 2 / 512 * x.T @ x
    >>> result = gptq_quantize(torch.randn(32, 64), H, WeightScheme(4, PerGroup(32)))
    >>> result.qweight.qweight.shape
    torch.Size([32, 64])
    >>> [r.qweight.qweight.shape for r in gptq_quantize_batched(torch.randn(8, 32, 64), H.expand(8, 64, 64),
    ...                                                         WeightScheme(4, PerGroup(32)))][0]
    torch.Size([32, 64])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .primitives import QuantizedWeight, compute_qparams, qparams_from_range
from .scheme import WeightScheme


@dataclass(frozen=True)
class GPTQResult:
    """A GPTQ-rounded weight and its proxy loss ``sum_i err_i^2 / [H^-1]_ii / 2`` (paper eq. 2)."""

    qweight: QuantizedWeight
    loss: float


class HessianNotPositiveDefinite(torch.linalg.LinAlgError):
    """The Hessian of stack entry ``index`` stays indefinite even with 1e5x damping."""

    def __init__(self, index: int) -> None:
        super().__init__(f"Hessian is not positive definite even with 1e5x damping (stack entry {index})")
        self.index = index


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factors ``[B, in, in]`` of ``(H + damp * mean(diag H) * I)^-1``, raising the damping
    (x10, up to five times) only for the matrices that need it."""
    mean_diag = torch.diagonal(hessian, dim1=-2, dim2=-1).mean(-1)  # (B,)
    upper, ok = _damped_inverse_cholesky(hessian, damp * mean_diag)
    for attempt in range(1, 6):
        if bool(ok.all()):
            return upper
        pending = torch.nonzero(~ok).reshape(-1)
        retry, retry_ok = _damped_inverse_cholesky(hessian[pending], damp * (10**attempt) * mean_diag[pending])
        upper[pending] = retry
        ok[pending] = retry_ok
    if bool(ok.all()):
        return upper
    raise HessianNotPositiveDefinite(int(torch.nonzero(~ok)[0]))


def _damped_inverse_cholesky(hessian: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factors of ``(H + lam I)^-1`` ``[B, in, in]`` and which succeeded ``(B,)``."""
    damped = hessian.clone()
    torch.diagonal(damped, dim1=-2, dim2=-1).add_(lam.unsqueeze(1))
    chol, info = torch.linalg.cholesky_ex(damped)
    del damped
    upper, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    return upper, (info == 0) & (info2 == 0)


def _qparams_for(columns: torch.Tensor, scheme: WeightScheme, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero) ``[..., out, 1]`` for one group of columns ``[..., out, width]``.

    With ``mse`` the range is shrunk by the factor in ``1, 0.99, ..., 0.8`` that minimises
    ``sum |w - Q(w)|^2.4`` per row (the reference GPTQ quantizer's ``mse`` option).
    """
    cols = columns.float()
    lo, hi = cols.amin(dim=-1, keepdim=True), cols.amax(dim=-1, keepdim=True)  # (..., out, 1)
    scale, zero = qparams_from_range(lo, hi, scheme)
    if not mse:
        return scale, zero
    best = _group_error(cols, scale, zero, scheme)
    for i in range(1, 21):
        # the range of cols * (1 - i/100), from the range of cols
        s, z = qparams_from_range(lo * (1 - i / 100), hi * (1 - i / 100), scheme)
        err = _group_error(cols, s, z, scheme)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better.unsqueeze(-1), s, scale)
        if zero is not None:
            zero = torch.where(better.unsqueeze(-1), z, zero)
    return scale, zero


def _group_error(cols: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: WeightScheme) -> torch.Tensor:
    """``sum |w - Q(w)|^2.4`` per row of one group ``[..., out, width]``."""
    _, dq = _round_column(cols, scale, zero, scheme)
    return (dq - cols).abs().pow(2.4).sum(dim=-1)


def static_qparams(W: torch.Tensor, scheme: WeightScheme, mse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero) ``[..., out, groups]`` of every group of ``W`` ``[..., out, in]``, fixed before any update."""
    if not mse:
        return compute_qparams(W, scheme)
    in_features = W.shape[-1]
    width = scheme.granularity.group_width(in_features)
    full = in_features // width
    lead = W.shape[:-1]
    # every full group is a row of its own for the search: [..., out, full, width] -> [rows, width]
    rows = W[..., : full * width].reshape(-1, width)
    parts = [tuple(t.reshape(*lead, full) if t is not None else None for t in _qparams_for(rows, scheme, mse=True))]
    if full * width < in_features:  # the ragged last group
        parts.append(_qparams_for(W[..., full * width :], scheme, mse=True))
    scale = torch.cat([p[0] for p in parts], dim=-1)
    zero = torch.cat([p[1] for p in parts], dim=-1) if parts[0][1] is not None else None
    return scale, zero


def _round_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: WeightScheme):
    """Integer and dequantized values of ``w`` (columns ``[..., out]`` or groups ``[..., out, width]``)."""
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
    """Quantize one ``weight`` ``[out, in]`` with GPTQ against the Hessian ``[in, in]`` of its inputs.

    The batch of one of :func:`gptq_quantize_batched` (same arguments, same integers).
    """
    return gptq_quantize_batched(
        weight.unsqueeze(0), hessian.unsqueeze(0), scheme, damp=damp, block_size=block_size, act_order=act_order,
        mse_scales=mse_scales,
    )[0]


def gptq_quantize_batched(
    weights: torch.Tensor,
    hessians: torch.Tensor,
    scheme: WeightScheme,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    mse_scales: bool = True,
) -> list[GPTQResult]:
    """Quantize a stack of weights ``[B, out, in]``, each against its own Hessian ``[B, in, in]``.

    Args:
        weights: the layer weights (any float dtype; computed in fp32).
        hessians: ``[B, in, in]`` (:attr:`~.stats.InputStats.hessian`; a shared one may be an ``expand``).
        scheme: bits, granularity (per-channel or per-group, ragged last group allowed), symmetry.
        damp: relative damping ``lambda = damp * mean(diag H)`` (paper sec. 4, "percdamp").
        block_size: columns per lazy-update block; rounded up to a multiple of the group size.
        act_order: quantize columns in order of decreasing ``diag(H)`` (static groups, see module doc).
        mse_scales: choose each group's range by a shrink search on ``|w - Q(w)|^2.4`` instead of min/max.

    Returns:
        One :class:`GPTQResult` per stack entry, each a :class:`QuantizedWeight` in ``scheme`` (original column order).

    Raises:
        HessianNotPositiveDefinite: naming the stack entry.
    """
    B, out_features, in_features = weights.shape
    W, H = _zero_dead_columns(weights, hessians)  # (B, out, in), (B, in, in)
    width = scheme.granularity.group_width(in_features)
    groups = scheme.granularity.num_groups(in_features)
    grouped = groups > 1
    # Per-channel, and act-order with groups: every scale is fixed up front from W.
    grid = _initial_grid(W, scheme, width, groups, static=not grouped or act_order, mse=mse_scales)

    if act_order:  # stable, so ties order the same whatever the stack
        perm = torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)  # (B, in)
    else:
        perm = torch.arange(in_features, device=W.device).expand(B, in_features)
    # column-major from here on: Wt[b, i] is column i of weight b, contiguous (B, in, out)
    Wt = W.transpose(1, 2).gather(1, perm.unsqueeze(2).expand(B, in_features, out_features)).contiguous()
    H = H.gather(1, perm.unsqueeze(2).expand(B, in_features, in_features))
    H = H.gather(2, perm.unsqueeze(1).expand(B, in_features, in_features))
    Hinv = _inverse_cholesky(H, damp)  # upper, (B, in, in)
    del H

    if grouped:
        block_size = max(width, -(-block_size // width) * width)
    Qt = torch.zeros_like(Wt)
    losses = torch.zeros(B, out_features, dtype=torch.float32, device=W.device)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        Q1, Err1 = _quantize_block(Wt[:, i1:i2].clone(), Hinv[:, i1:i2, i1:i2], perm[:, i1:i2], grid, losses)
        Qt[:, i1:i2] = Q1
        # lazy batch update: the block's accumulated error reaches the remaining columns at once
        Wt[:, i2:] -= torch.bmm(Hinv[:, i1:i2, i2:].transpose(1, 2), Err1)

    inverse = torch.argsort(perm, dim=-1)
    qweight = Qt.gather(1, inverse.unsqueeze(2).expand(B, in_features, out_features)).transpose(1, 2).to(torch.int8)
    return [
        GPTQResult(
            qweight=QuantizedWeight(qweight=qweight[b].contiguous(), scale=grid.scale[b],
                                    zero=grid.zero[b] if grid.zero is not None else None, scheme=scheme),
            loss=float(losses[b].sum()),
        )
        for b in range(B)
    ]


@dataclass(frozen=True)
class _Grid:
    """The quantization grid GPTQ fills: per-group scale (and zero) ``(B, out, groups)``, written in place."""

    scheme: WeightScheme
    width: int  # columns per group (the last may be shorter)
    scale: torch.Tensor
    zero: torch.Tensor | None
    static: bool  # every group's scale fixed up front; otherwise set when the group's first column comes
    mse: bool


def _zero_dead_columns(weights: torch.Tensor, hessians: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 copies of ``weights`` ``(B, out, in)`` and ``hessians`` ``(B, in, in)``; inputs that never fire
    get ``H_ii = 1`` and a zero weight."""
    W = weights.detach().to(torch.float32).clone()
    H = hessians.detach().to(torch.float32).clone()  # contiguous even when given as an expand
    diagonal = torch.diagonal(H, dim1=-2, dim2=-1)  # (B, in), a view
    dead = diagonal == 0
    diagonal.masked_fill_(dead, 1.0)
    W.masked_fill_(dead.unsqueeze(1), 0.0)
    return W, H


def _initial_grid(W: torch.Tensor, scheme: WeightScheme, width: int, groups: int, *, static: bool, mse: bool) -> _Grid:
    """Static grids get every scale from ``W`` now; dynamic ones get empty tensors to fill."""
    B, out_features = W.shape[:2]
    if static:
        scale, zero = _rowwise_qparams(W, scheme, mse)  # (B, out, groups)
    else:
        scale = torch.empty(B, out_features, groups, dtype=torch.float32, device=W.device)
        zero = torch.empty(B, out_features, groups, dtype=torch.int8, device=W.device) if not scheme.symmetric else None
    return _Grid(scheme, width, scale, zero, static, mse)


CACHE_ELEMENTS = 1 << 18  # rows per chunk of the range search: about 1 MiB of fp32, so it runs in cache


def _rowwise_qparams(W: torch.Tensor, scheme: WeightScheme, mse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`static_qparams` of ``W`` ``(B, out, in)`` in chunks of rows (every row's range is its own, so the
    values equal one call on the whole stack; the range search is memory-bound and a large stack misses the cache)."""
    B, out_features, in_features = W.shape
    rows = W.reshape(B * out_features, in_features)
    step = max(1, CACHE_ELEMENTS // in_features)
    parts = [static_qparams(rows[r : r + step], scheme, mse) for r in range(0, rows.shape[0], step)]
    scale = torch.cat([p[0] for p in parts]).view(B, out_features, -1)
    zero = torch.cat([p[1] for p in parts]).view(B, out_features, -1) if parts[0][1] is not None else None
    return scale, zero


SUB_BLOCK = 16  # columns whose rank-one updates run column by column; later columns of the block get one bmm


def _block_scales(grid: _Grid, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Static grids: scale (and zero) of every column of a block, ``(B, b, out)``, from original columns ``cols`` ``(B, b)``."""
    index = (cols // grid.width).unsqueeze(2).expand(-1, -1, grid.scale.shape[1])  # (B, b, out)
    scale = grid.scale.transpose(1, 2).gather(1, index)
    zero = grid.zero.transpose(1, 2).gather(1, index).float() if grid.zero is not None else None
    return scale, zero


def _start_group(grid: _Grid, W1: torch.Tensor, i: int, g: int) -> None:
    """Dynamic grids: group ``g`` starts at column ``i`` of the block ``W1`` ``(B, b, out)``; its columns
    ``W1[:, i:i+width]`` are up to date (a sub-block never spans a group start), so its range is set from them."""
    s, z = _qparams_for(W1[:, i : i + grid.width].transpose(1, 2), grid.scheme, mse=grid.mse)  # (B, out, 1)
    grid.scale[:, :, g : g + 1] = s
    if grid.zero is not None:
        grid.zero[:, :, g : g + 1] = z


def _sub_blocks(start: int, b: int, grid: _Grid) -> list[tuple[int, int]]:
    """``[j1, j2)`` column ranges of a block of ``b`` columns starting at original column ``start``; with a
    dynamic grid every group start begins a sub-block."""
    bounds, j = [], 0
    while j < b:
        end = min(j + SUB_BLOCK, b)
        if not grid.static:
            next_group = ((start + j) // grid.width + 1) * grid.width - start
            end = min(end, next_group)
        bounds.append((j, end))
        j = end
    return bounds


def _quantize_block(
    W1: torch.Tensor, Hinv1: torch.Tensor, cols: torch.Tensor, grid: _Grid, losses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round the block ``W1`` ``(B, b, out)`` (column-major) column by column, each error fed back onto the
    block's later columns through ``Hinv1`` ``(B, b, b)`` (Algorithm 1, inner loop); ``cols`` ``(B, b)`` are
    the original column indices; ``losses`` ``(B, out)`` grows in place.

    Within a sub-block of :data:`SUB_BLOCK` columns the updates are rank-one, column by column; the rest of
    the block gets the sub-block's errors in one ``bmm`` (the paper's lazy batch update, one level down).

    Returns:
        ``(Q1, Err1)``: the integer columns and the scaled errors ``(w - Q(w)) / [H^-1]_ii``, ``(B, b, out)``.
    """
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    diff = torch.zeros_like(W1)  # w - Q(w)
    d = torch.diagonal(Hinv1, dim1=-2, dim2=-1).unsqueeze(2)  # (B, b, 1)
    Hinv1_t = Hinv1.transpose(1, 2)  # [b, j, i] = Hinv1[b, i, j]
    start = int(cols[0, 0])
    scales, zeros = _block_scales(grid, cols) if grid.static else (None, None)
    for j1, j2 in _sub_blocks(start, W1.shape[1], grid):
        if not grid.static and (start + j1) % grid.width == 0:
            _start_group(grid, W1, j1, (start + j1) // grid.width)
        for i in range(j1, j2):
            if grid.static:
                s, z = scales[:, i], (zeros[:, i] if zeros is not None else None)
            else:
                g = (start + i) // grid.width
                s, z = grid.scale[:, :, g], (grid.zero[:, :, g].float() if grid.zero is not None else None)
            w = W1[:, i]  # (B, out)
            q, dq = _round_column(w, s, z, grid.scheme)
            Q1[:, i] = q
            diff[:, i] = w - dq
            err = diff[:, i] / d[:, i]
            Err1[:, i] = err
            W1[:, i + 1 : j2] -= Hinv1_t[:, i + 1 : j2, i : i + 1] * err.unsqueeze(1)
        if j2 < W1.shape[1]:
            W1[:, j2:] -= torch.bmm(Hinv1_t[:, j2:, j1:j2], Err1[:, j1:j2])
    losses += (diff**2 / d**2 / 2).sum(dim=1)
    return Q1, Err1
