"""Pure tensor math for integer weight quantization: no modules, no I/O.

Conventions (shared with the compressed-tensors format so artifacts need no conversion):
integers are signed, ``q in [qmin, qmax]`` (int4: [-8, 7]; int8: [-128, 127]);
``w ~= (q - zero) * scale``; the zero point is a signed integer in the same range and is
absent for symmetric schemes. Weights are ``[..., out, in]``; scales and zero points are
``[..., out, groups]``. Leading dimensions (e.g. MoE experts) are carried through.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dsq.core.errors import QuantizationError

from .scheme import WeightScheme

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer weight with its quantization parameters.

    Attributes:
        qweight: int8 tensor ``[..., out, in]`` holding values in ``[qmin, qmax]``.
        scale: float tensor ``[..., out, groups]``.
        zero: int8 tensor ``[..., out, groups]`` or ``None`` (symmetric).
        scheme: the scheme that produced it.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    scheme: WeightScheme

    @property
    def in_features(self) -> int:
        return self.qweight.shape[-1]


def _pad_to_groups(weight: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, int]:
    """Reshape ``[..., out, in]`` into ``[..., out, groups, width]``, padding a ragged last group.

    Padding uses the row's first value of the last group so that min/max are unaffected.
    """
    in_features = weight.shape[-1]
    groups = scheme.granularity.num_groups(in_features)
    width = scheme.granularity.group_width(in_features)
    pad = groups * width - in_features
    if pad:
        last = weight[..., (groups - 1) * width : (groups - 1) * width + 1]
        weight = torch.cat([weight, last.expand(*weight.shape[:-1], pad)], dim=-1)
    return weight.reshape(*weight.shape[:-1], groups, width), pad


def expand_groups(t: torch.Tensor, scheme: WeightScheme, in_features: int) -> torch.Tensor:
    """Broadcast per-group values ``[..., out, groups]`` to ``[..., out, in]``."""
    width = scheme.granularity.group_width(in_features)
    return t.repeat_interleave(width, dim=-1)[..., :in_features]


def compute_qparams(
    weight: torch.Tensor, scheme: WeightScheme
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max quantization parameters for ``weight`` ``[..., out, in]``.

    Returns:
        ``(scale, zero)``: scale fp32 ``[..., out, groups]``; zero int8 of the same shape,
        or ``None`` for symmetric schemes.
    """
    grouped, _ = _pad_to_groups(weight.float(), scheme)  # (..., out, groups, width)
    return qparams_from_range(grouped.amin(dim=-1), grouped.amax(dim=-1), scheme)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero) of groups whose smallest and largest values are ``lo`` and ``hi`` (fp32, any shape).

    Symmetric: ``max|w| / qmax``; asymmetric: the range ``[min(lo, 0), max(hi, 0)]`` over ``qmax - qmin``.
    A range shrunk by ``c > 0`` is ``(lo * c, hi * c)``: the same values as the range of ``w * c``, because
    rounding is monotonic.
    """
    eps = torch.finfo(torch.float32).tiny
    if scheme.symmetric:
        amax = torch.maximum(-lo, hi)
        scale = (amax / scheme.qmax).clamp_min(eps)
        return scale, None
    wmin = lo.clamp(max=0.0)
    wmax = hi.clamp(min=0.0)
    scale = ((wmax - wmin) / (scheme.qmax - scheme.qmin)).clamp_min(eps)
    zero = (scheme.qmin - torch.round(wmin / scale)).clamp(scheme.qmin, scheme.qmax)
    return scale, zero.to(torch.int8)


def quantize_with_qparams(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: WeightScheme
) -> QuantizedWeight:
    """Round ``weight`` to integers with given parameters (``q = clamp(round(w/s) + z)``)."""
    in_features = weight.shape[-1]
    s = expand_groups(scale, scheme, in_features)
    q = torch.round(weight.float() / s)
    if zero is not None:
        q = q + expand_groups(zero, scheme, in_features).float()
    q = q.clamp(scheme.qmin, scheme.qmax).to(torch.int8)
    return QuantizedWeight(qweight=q, scale=scale, zero=zero, scheme=scheme)


def quantize_rtn(weight: torch.Tensor, scheme: WeightScheme) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight`` ``[..., out, in]`` with min/max parameters."""
    scale, zero = compute_qparams(weight, scheme)
    return quantize_with_qparams(weight, scale, zero, scheme)


def dequantize(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scheme: WeightScheme,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - zero) * scale`` broadcast over groups; returns ``[..., out, in]`` in ``dtype``."""
    in_features = qweight.shape[-1]
    w = qweight.to(scale.dtype)
    if zero is not None:
        w = w - expand_groups(zero, scheme, in_features).to(scale.dtype)
    return (w * expand_groups(scale, scheme, in_features)).to(dtype)


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize a :class:`QuantizedWeight`."""
    return dequantize(qw.qweight, qw.scale, qw.zero, qw.scheme, dtype)


def stack_weights(qws: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack per-expert weights ``[out, in]`` into one ``[E, out, in]`` (scales and zero points too)."""
    zero = torch.stack([q.zero for q in qws]) if qws[0].zero is not None else None
    return QuantizedWeight(torch.stack([q.qweight for q in qws]), torch.stack([q.scale for q in qws]), zero, qws[0].scheme)


def cat_rows(qws: list[QuantizedWeight]) -> QuantizedWeight:
    """Concatenate weights ``[out_i, in]`` along the output rows into one ``[sum out_i, in]`` (scales and zero points too)."""
    zero = torch.cat([q.zero for q in qws]) if qws[0].zero is not None else None
    return QuantizedWeight(torch.cat([q.qweight for q in qws]), torch.cat([q.scale for q in qws]), zero, qws[0].scheme)


def quantize_rtn_slices(weight: torch.Tensor, scheme: WeightScheme) -> QuantizedWeight:
    """:func:`quantize_rtn` of ``[E, out, in]`` one slice (expert) at a time, into preallocated outputs.

    The result equals ``quantize_rtn(weight, scheme)``; the fp32 temporaries are those of one slice.
    """
    first = quantize_rtn(weight[0], scheme)

    def alloc(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.empty((weight.shape[0], *t.shape), dtype=t.dtype, device=t.device)

    qweight, scale, zero = alloc(first.qweight), alloc(first.scale), alloc(first.zero)
    for e in range(weight.shape[0]):
        qw = first if e == 0 else quantize_rtn(weight[e], scheme)
        qweight[e] = qw.qweight
        scale[e] = qw.scale
        if zero is not None:
            zero[e] = qw.zero
    return QuantizedWeight(qweight, scale, zero, scheme)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 values ``[..., n]`` into bytes ``[..., ceil(n/2)]``.

    Each value is stored offset by 8 (unsigned 0..15); element ``2j`` goes to the low nibble
    of byte ``j`` and element ``2j+1`` to the high nibble (the layout of compressed-tensors'
    int32 words on little-endian hosts and of ONNX Runtime's MatMulNBits).
    """
    if q.dim() > 2:  # slice by slice (e.g. per expert): temporaries of one slice, not of all
        out = torch.empty((*q.shape[:-1], (q.shape[-1] + 1) // 2), dtype=torch.uint8, device=q.device)
        for i in range(q.shape[0]):
            out[i] = pack_int4(q[i])
        return out
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[-1] % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: bytes ``[..., ceil(n/2)]`` to int8 ``[..., n]``."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)[..., :n]


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(|x|^2 / |x - x_hat|^2)``."""
    noise = (reference.float() - approx.float()).pow(2).sum()
    signal = reference.float().pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))


def calibrated_scale(name: str, amax: torch.Tensor, divisor: float, what: str) -> torch.Tensor:
    """Static scale(s) ``amax / divisor`` (fp32) from calibration maxima ``amax`` of ``name``.

    NaN, inf or negative statistics are refused. An entry of 0 (``what`` observed nothing: an expert that got
    no token, a cache slot of zeros) borrows the largest entry of the same tensor, with a warning naming
    ``name``; if every entry is 0 the amax is 1.

    Raises:
        QuantizationError: non-finite or negative ``amax``, naming ``name``.
    """
    amax = amax.detach().float()
    if not torch.isfinite(amax).all() or (amax < 0).any():
        raise QuantizationError(f"{name}: calibration maxima have NaN, inf or negative values; refusing to quantize")
    empty = amax == 0
    if empty.any():
        fallback = amax.max() if not empty.all() else torch.tensor(1.0)
        _log.warning("%s: %d %s saw nothing in calibration; using amax %.4g", name, int(empty.sum()), what, float(fallback))
        amax = torch.where(empty, fallback, amax)
    return (amax / divisor).clamp_min(torch.finfo(torch.float32).tiny)
