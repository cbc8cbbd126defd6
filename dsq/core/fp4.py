"""FP4 (e2m1) routed experts with one scale per row and 32 columns, as DeepSeek-V4's official checkpoints store them.

DeepSeek-V4 keeps its attention and dense Linear weights FP8 block-scaled (:mod:`dsq.core.fp8`) and its
routed experts FP4: each projection ``[out, in]`` (``layers.N.ffn.experts.E.w1.weight`` ...) is stored as
``int8`` ``[out, in / 2]``, two e2m1 codes per byte along the input dimension (K), the even column in the
low nibble and the odd column in the high nibble, next to scales ``[out, ceil(in / 32)]``
(``...experts.E.w1.scale``), one per row and group of 32 columns: UE8M0 powers of two
(``float8_e8m0fnu``) under ``scale_fmt: ue8m0``. An e2m1 code is a sign bit (bit 3) and a 3-bit index
into the magnitudes ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` (OCP Microscaling Formats v1.0, FP4 E2M1).
``config.json`` declares it with ``"expert_dtype": "fp4"`` beside the FP8 ``quantization_config``
(:func:`dsq.core.fp8.expert_dtype`).

This is how transformers 5.25 reads them (``integrations/finegrained_fp8.py``): ``FP8Experts`` allocates
FP4 experts as ``int8`` with K halved and scales at ``sf_gran_n=1, sf_gran_k=32``, and
``Fp8Dequantize._unpack_fp4`` decodes ``lut[byte & 0xF]`` then ``lut[byte >> 4]`` along the last
dimension with the table ``_FP4_E2M1_LUT`` (= :data:`E2M1_VALUES`), then multiplies by the scales (a
``uint8`` scale is a UE8M0 exponent byte, ``2 ** (byte - 127)``).

Example:
    >>> packed, scale = quantize_fp4(torch.tensor([[0.5, -3.0, 6.0, 0.0]]), FP4ExpertFormat())
    >>> packed.dtype, tuple(packed.shape), tuple(scale.shape)
    (torch.int8, (1, 2), (1, 1))
    >>> dequantize_fp4("w", packed, scale, FP4ExpertFormat(), dtype=torch.float32).tolist()
    [[0.5, -3.0, 6.0, 0.0]]
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dsq.core.errors import CheckpointError
from dsq.core.fp8 import (
    UE8M0_DTYPE,
    check_scales,
    expert_dtype,
    fp8_format,
    power_of_two_at_least,
)

E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The value of each 4-bit e2m1 code (bit 3 the sign)."""

E2M1_MAX = 6.0
"""Largest e2m1 magnitude: a group's amax maps to it."""

FP4_SAFETENSORS_DTYPES: frozenset[str] = frozenset({"I8", "U8"})
"""safetensors dtypes packed FP4 weights are stored in (DeepSeek-V4 writes ``I8``)."""

_PACKED_DTYPES: tuple[torch.dtype, ...] = (torch.int8, torch.uint8)

# Midpoints between consecutive e2m1 magnitudes: a magnitude rounds to the index of its interval.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


@dataclass(frozen=True)
class FP4ExpertFormat:
    """Packed FP4 (e2m1) expert weights with one scale per row and ``group`` input columns.

    Attributes:
        group: Input columns per scale (32 in DeepSeek-V4); the last group of a row may be smaller.
        ue8m0_scales: :func:`quantize_fp4` writes power-of-two ``float8_e8m0fnu`` scales (DeepSeek-V4's
            ``scale_fmt: ue8m0``); otherwise float32. Reading decodes a scale by its dtype either way.
    """

    group: int = 32
    ue8m0_scales: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.group, int) or isinstance(self.group, bool) or self.group < 2 or self.group % 2:
            raise ValueError(f"FP4ExpertFormat.group must be a positive even integer, got {self.group!r}")

    def packed_shape(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
        """Stored shape of an ``[out, in]`` weight: ``(out, in / 2)``, two codes per byte (``in`` must be even)."""
        rows, cols = shape
        return rows, cols // 2

    def scale_shape(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
        """Scale shape of an ``[out, in]`` weight (its real shape, not the packed one): ``(out, ceil(in / group))``."""
        rows, cols = shape
        return rows, math.ceil(cols / self.group)


def fp4_format(config: Mapping[str, Any]) -> FP4ExpertFormat | None:
    """The FP4 expert format a checkpoint's ``config.json`` declares, if any.

    Args:
        config: Parsed ``config.json``.

    Returns:
        ``None`` unless the config declares an FP8 ``quantization_config`` and ``expert_dtype: "fp4"``
        (top level or in ``quantization_config``); else the format, its scales UE8M0 when the FP8
        ``scale_fmt`` is ``ue8m0``.

    Raises:
        CheckpointError: The FP8 config or ``expert_dtype`` is not supported (the message names the key).

    Example:
        >>> qc = {"quant_method": "fp8", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
        >>> fp4_format({"expert_dtype": "fp4", "quantization_config": qc})
        FP4ExpertFormat(group=32, ue8m0_scales=True)
    """
    fp8 = fp8_format(config)
    if fp8 is None or expert_dtype(config)[1] != "fp4":
        return None
    return FP4ExpertFormat(ue8m0_scales=fp8.ue8m0_scales)


def _checked_scales(
    name: str, packed: torch.Tensor, scale: torch.Tensor, fmt: FP4ExpertFormat, label: str
) -> torch.Tensor:
    """The decoded float32 scales, once packed weight and scales are checked."""
    if packed.dtype not in _PACKED_DTYPES:
        raise CheckpointError(f"FP4 weight {name} has dtype {packed.dtype}; expected torch.int8 (two e2m1 codes per byte)")
    if packed.dim() != 2:
        raise CheckpointError(f"FP4 weight {name} has shape {tuple(packed.shape)}; expected a 2-D weight")
    real = (packed.shape[0], 2 * packed.shape[1])
    expected = fmt.scale_shape(real)
    if tuple(scale.shape) != expected:
        raise CheckpointError(
            f"scales {label} of FP4 weight {name} {tuple(packed.shape)} (packed; {real} unpacked) have shape "
            f"{tuple(scale.shape)}; expected {expected}, one per row and {fmt.group} columns"
        )
    return check_scales(f"scales {label} of FP4 weight {name}", scale, "row, group")


def dequantize_fp4(
    name: str,
    packed: torch.Tensor,
    scale: torch.Tensor,
    fmt: FP4ExpertFormat,
    dtype: torch.dtype = torch.bfloat16,
    *,
    scale_label: str | None = None,
) -> torch.Tensor:
    """The real weight of a packed FP4 tensor: ``e2m1(code) * scale[row, column // group]``, in fp32.

    Working memory: the int64 code indices of one nibble at a time and one fp32 copy of the weight
    (scaled in place), plus the result when ``dtype`` is not float32.

    Args:
        name: The weight's name, used in error messages.
        packed: ``int8`` (or ``uint8``) ``[out, in / 2]``; byte ``j`` of a row holds column ``2j`` in its
            low nibble and column ``2j + 1`` in its high nibble.
        scale: ``[out, ceil(in / group)]`` scales: UE8M0 (``float8_e8m0fnu``, or exponent bytes as
            ``uint8``) or float (:func:`dsq.core.fp8.decode_scales`).
        fmt: The format (its group size).
        dtype: dtype of the result.
        scale_label: Name of the scale tensor in messages (default ``name`` with ``.weight`` -> ``.scale``).

    Returns:
        The ``[out, in]`` weight in ``dtype``.

    Raises:
        CheckpointError: Wrong dtype or rank, a scale shape that does not fit, a non-finite or negative
            scale. Every message names the tensor.
    """
    label = scale_label or name.removesuffix(".weight") + ".scale"
    scales = _checked_scales(name, packed, scale, fmt, label)
    codes = packed.view(torch.uint8)  # (out, in / 2)
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    out = torch.empty(codes.shape[0], codes.shape[1], 2, dtype=torch.float32)
    out[..., 0] = lut[codes.bitwise_and(0x0F).long()]  # even columns: low nibble
    out[..., 1] = lut[codes.bitwise_right_shift(4).long()]  # odd columns: high nibble
    out = out.view(codes.shape[0], -1)  # (out, in)
    full = out.shape[1] // fmt.group  # groups of full width
    if full:
        out[:, : full * fmt.group].unflatten(1, (full, fmt.group)).mul_(scales[:, :full, None])
    if full * fmt.group < out.shape[1]:  # the ragged last group
        out[:, full * fmt.group :].mul_(scales[:, full : full + 1])
    return out if dtype == torch.float32 else out.to(dtype)


def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code of each value of ``x`` (already within +-6), ties to the even mantissa; uint8."""
    midpoints = torch.tensor(_MIDPOINTS, dtype=torch.float32)
    magnitude = x.abs()
    below = torch.bucketize(magnitude, midpoints, right=False)  # a tie goes to the smaller magnitude
    above = torch.bucketize(magnitude, midpoints, right=True)  # ... or to the larger one
    index = torch.where(below % 2 == 0, below, above)  # the even index has mantissa bit 0
    sign = ((x < 0) & (index > 0)).to(torch.uint8) << 3  # no negative zero
    return index.to(torch.uint8) | sign


def quantize_fp4(weight: torch.Tensor, fmt: FP4ExpertFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to packed FP4 e2m1 with per-row, per-group scales, as DeepSeek-V4 stores experts.

    Used to write synthetic checkpoints. Each group's scale is its absolute maximum / 6 (rounded up to a
    power of two for UE8M0), an all-zero group gets scale 1; every value rounds to the nearest e2m1 value.

    Args:
        weight: Floating-point ``[out, in]`` weight, ``in`` even (computed in fp32).
        fmt: The format.

    Returns:
        ``(packed [out, in / 2] int8, scale [out, ceil(in / group)])``, the scales ``float8_e8m0fnu`` with
        ``fmt.ue8m0_scales``, else float32.

    Raises:
        ValueError: ``weight`` is not 2-D floating point, has an odd number of columns, or holds
            non-finite values.
    """
    if weight.dim() != 2 or not weight.is_floating_point() or weight.shape[1] % 2:
        raise ValueError(
            f"quantize_fp4 needs a 2-D floating-point weight with an even number of columns, got {weight.dtype} "
            f"{tuple(weight.shape)}"
        )
    rows, cols = weight.shape
    groups = math.ceil(cols / fmt.group)
    padded = torch.nn.functional.pad(weight.to(torch.float32), (0, groups * fmt.group - cols))
    blocks = padded.view(rows, groups, fmt.group)
    amax = blocks.abs().amax(dim=-1)  # (rows, groups)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("quantize_fp4: the weight holds non-finite values")
    scale = torch.where(amax > 0, amax / E2M1_MAX, torch.ones_like(amax))
    if fmt.ue8m0_scales:
        scale = power_of_two_at_least(scale)
    codes = _e2m1_codes((blocks / scale[..., None]).clamp(-E2M1_MAX, E2M1_MAX).view(rows, -1)[:, :cols])
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.view(torch.int8), (scale.to(UE8M0_DTYPE) if fmt.ue8m0_scales else scale)
