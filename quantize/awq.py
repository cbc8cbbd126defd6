"""AWQ: activation-aware scale search and weight clipping (Lin et al., 2024, arXiv:2306.00978).

Pure tensor math. :func:`search_scale` picks, on a grid of exponents ``r``, the per-channel
scale ``s = mean|x|^r`` (normalised so ``max(s) * min(s) = 1``) that minimises the output
error of the quantized balance layers, ``|| Q(W s) (x / s) - W x ||^2`` (paper eq. 4-5).
:func:`search_clip` then shrinks each group's range so rounding error on the real inputs is
smallest (the reference implementation's ``auto_clip``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .primitives import dequantize_weight, quantize_rtn
from .scheme import PerGroup, WeightScheme


@dataclass(frozen=True)
class ScaleSearch:
    """Chosen balance scale: ``s`` ``[C]``, its exponent ``ratio`` and the loss against ``s = 1``."""

    s: torch.Tensor
    ratio: float
    loss: float
    loss_unscaled: float


def fake_quantize(weight: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """``dequantize(quantize_rtn(weight))`` in fp32 (weights ``[..., out, in]``)."""
    return dequantize_weight(quantize_rtn(weight.float(), scheme), torch.float32)


def _outputs(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x`` ``(n, C)`` through ``w`` ``(out, C)`` or ``(E, out, C)`` -> ``(n, out)`` / ``(E, n, out)``."""
    return x @ w.transpose(-1, -2)


def weight_mean(weights: list[torch.Tensor], scheme: WeightScheme) -> torch.Tensor:
    """Mean over output rows of ``|w|`` normalised by its group's max, per input channel ``(C,)``."""
    rows = torch.cat([w.detach().float().reshape(-1, w.shape[-1]) for w in weights])  # (rows, C)
    C = rows.shape[-1]
    width = scheme.granularity.group_width(C)
    groups = scheme.granularity.num_groups(C)
    g = _padded_groups(rows.abs(), width, groups)
    g = g / (g.amax(dim=-1, keepdim=True) + 1e-6)
    return g.reshape(rows.shape[0], -1)[:, :C].mean(0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, grid: int) -> list[tuple[float, torch.Tensor]]:
    """``(ratio, s)`` for ``ratio = 0, 1/grid, ..., (grid-1)/grid``.

    ``s = mean|x|^r / mean|w|^(1-r)`` (the reference implementation's "duo scaling"), or
    ``mean|x|^r`` without ``w_mean``; normalised so that ``max(s) * min(s) = 1``.
    """
    base = x_mean.float().clamp_min(1e-4)
    out = []
    for i in range(grid):
        ratio = i / grid
        s = base.pow(ratio)
        if w_mean is not None:
            s = s / (w_mean.float().pow(1 - ratio) + 1e-4)
        s = s.clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        out.append((ratio, s))
    return out


@torch.no_grad()
def search_scale(
    x: torch.Tensor,
    x_mean: torch.Tensor,
    weights: list[torch.Tensor],
    scheme: WeightScheme,
    *,
    grid: int = 20,
    duo_scaling: bool = True,
) -> ScaleSearch:
    """Grid-search the balance scale for layers ``weights`` that read activations ``x``.

    Args:
        x: sample of input rows ``(n, C)``.
        x_mean: mean ``|x|`` per channel over all calibration tokens ``(C,)``.
        weights: balance layers, each ``(out, C)`` or ``(E, out, C)`` (fused experts).
        scheme: the weight scheme they will be quantized with.
        grid: number of exponents tried.
        duo_scaling: divide by the normalised weight magnitude too (see :func:`candidate_scales`).

    Returns:
        :class:`ScaleSearch`; ``ratio`` is NaN when no candidate beat ``s = 1`` (kept unscaled).
    """
    x = x.float()
    ws = [w.float() for w in weights]
    refs = [_outputs(x, w) for w in ws]

    def loss_of(s: torch.Tensor) -> float:
        return sum(float((_outputs(x, fake_quantize(w * s, scheme) / s) - ref).pow(2).mean()) for w, ref in zip(ws, refs))

    one = torch.ones_like(x_mean, dtype=torch.float32)
    unscaled = loss_of(one)
    best = ScaleSearch(s=one, ratio=float("nan"), loss=unscaled, loss_unscaled=unscaled)  # s = 1 unless beaten
    w_mean = weight_mean(ws, scheme) if duo_scaling else None
    for ratio, s in candidate_scales(x_mean, w_mean, grid):
        loss = loss_of(s)
        if loss < best.loss:
            best = ScaleSearch(s=s, ratio=ratio, loss=loss, loss_unscaled=unscaled)
    return best


def _padded_groups(t: torch.Tensor, width: int, groups: int) -> torch.Tensor:
    """``(rows, C)`` -> ``(rows, groups, width)``, zero padding a ragged last group."""
    pad = groups * width - t.shape[-1]
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.reshape(t.shape[0], groups, width)


@torch.no_grad()
def search_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    scheme: WeightScheme,
    *,
    grid: int = 20,
    max_shrink: float = 0.5,
    rows_per_chunk: int = 256,
) -> torch.Tensor:
    """Clip each group of ``weight`` ``(out, C)`` to the range that minimises its output error on ``x``.

    For every output row and group the threshold ``t = max|w| * (1 - i/grid)``, ``i < max_shrink *
    grid``, with the smallest ``mean_n (x_g . Q(clip(w_g, t)) - x_g . w_g)^2`` is kept.

    Returns:
        The clipped weight ``(out, C)`` in fp32; quantizing it with ``scheme`` gives the AWQ weight.
    """
    out_features, in_features = weight.shape
    width = scheme.granularity.group_width(in_features)
    groups = scheme.granularity.num_groups(in_features)
    group_scheme = WeightScheme(scheme.bits, PerGroup(width), scheme.symmetric)
    xg = _padded_groups(x.float(), width, groups)  # (n, G, width)
    clipped = []
    for r0 in range(0, out_features, rows_per_chunk):
        w = _padded_groups(weight[r0 : r0 + rows_per_chunk].float(), width, groups)  # (o, G, width)
        ref = torch.einsum("ngk,ogk->nog", xg, w)
        amax = w.abs().amax(dim=-1, keepdim=True)  # (o, G, 1)
        best_err = torch.full(w.shape[:2], float("inf"))
        best_max = amax.clone()
        for i in range(max(1, int(max_shrink * grid))):
            t = amax * (1 - i / grid)
            cur = torch.maximum(torch.minimum(w, t), -t)
            q = fake_quantize(cur.reshape(cur.shape[0], -1), group_scheme).reshape_as(cur)
            err = (torch.einsum("ngk,ogk->nog", xg, q) - ref).pow(2).mean(dim=0)  # (o, G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better.unsqueeze(-1), t, best_max)
        cur = torch.maximum(torch.minimum(w, best_max), -best_max)
        clipped.append(cur.reshape(cur.shape[0], -1)[:, :in_features])
    return torch.cat(clipped)
