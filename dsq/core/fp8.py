"""FP8 (e4m3) block-scaled weights, the format of the official DeepSeek-V3/R1 checkpoints.

In those checkpoints every Linear weight inside the decoder layers (attention projections, dense
and shared-expert MLPs, every routed expert) is stored as ``float8_e4m3fn`` next to a float32
``<name>_scale_inv`` tensor (``...proj.weight`` -> ``...proj.weight_scale_inv``) of shape
``[ceil(out / 128), ceil(in / 128)]``. The real weight of each 128 x 128 block is the fp8 value times
the block's scale; blocks on the right and bottom edges are smaller when a dimension is not a
multiple of 128. ``config.json`` declares the format::

    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                            "quant_method": "fp8", "weight_block_size": [128, 128]}

DeepSeek-V4 ships the same e4m3 blocks with two differences: its scales are UE8M0 (one byte per
block, the power of two ``2 ** (byte - 127)``; safetensors dtype ``F8_E8M0``, ``torch.float8_e8m0fnu``),
declared as ``"scale_fmt": "ue8m0"``, and they are named after the module (``...wq_a.weight`` ->
``...wq_a.scale``, the name transformers renames to ``weight_scale_inv`` in
``FineGrainedFP8HfQuantizer.update_weight_conversions``). Its routed experts are FP4 (see
:mod:`dsq.core.fp4`). Scales are decoded by their dtype, as transformers' ``Fp8Dequantize`` does:
float scales are the multiplier, ``float8_e8m0fnu`` scales convert exactly, and ``uint8`` scales are raw
UE8M0 exponent bytes.

This module reads that declaration (:func:`fp8_format`), dequantizes one weight at a time
(:func:`dequantize_fp8_blocks`, so a checkpoint can be converted shard by shard), and quantizes
(:func:`quantize_fp8_blocks`, used to write synthetic FP8 checkpoints).

Example:
    >>> w = torch.randn(300, 200)
    >>> q, s = quantize_fp8_blocks(w, FP8BlockFormat())
    >>> q.dtype, tuple(s.shape)
    (torch.float8_e4m3fn, (3, 2))
    >>> dequantize_fp8_blocks("w", q, s, FP8BlockFormat(), dtype=torch.float32).shape
    torch.Size([300, 200])
"""
from __future__ import annotations

import math
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dsq.core.errors import CheckpointError

FP8_DTYPE = torch.float8_e4m3fn
"""Storage dtype of FP8 weights."""

FP8_SAFETENSORS_DTYPE = "F8_E4M3"
"""The same dtype as safetensors headers spell it."""

FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
"""Largest finite e4m3fn value (448): a block's amax maps to it."""

SCALE_SUFFIX = "_scale_inv"
"""Appended to a weight's name to name its block scales (``x.weight`` -> ``x.weight_scale_inv``)."""

MODULE_SCALE_SUFFIX = ".scale"
"""DeepSeek-V4's scale name: the weight's module and ``.scale`` (``x.weight`` -> ``x.scale``)."""

UE8M0_DTYPE = torch.float8_e8m0fnu
"""Storage dtype of UE8M0 scales (an exponent byte, value ``2 ** (byte - 127)``; 0xFF is NaN)."""

UE8M0_SAFETENSORS_DTYPE = "F8_E8M0"

SUPPORTED_FMTS: tuple[str, ...] = ("e4m3",)
SUPPORTED_SCALE_FMTS: tuple[str, ...] = ("float", "ue8m0")
_SCALE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, UE8M0_DTYPE, torch.uint8)

SCALE_SAFETENSORS_DTYPES: frozenset[str] = frozenset({"F32", "BF16", "F16", UE8M0_SAFETENSORS_DTYPE, "U8"})
"""safetensors dtypes of block scales: float multipliers, UE8M0, or UE8M0 exponents stored as bytes."""


@dataclass(frozen=True)
class FP8BlockFormat:
    """Block-scaled FP8 (e4m3) weights.

    Attributes:
        block: (rows, columns) of one scaling block; edge blocks may be smaller.
        ue8m0_scales: Scales are powers of two stored as UE8M0 (``scale_fmt: ue8m0``, DeepSeek-V4);
            otherwise float32 (DeepSeek-V3). Reading decodes a scale by its dtype either way; this
            decides what :func:`quantize_fp8_blocks` writes.
    """

    block: tuple[int, int] = (128, 128)
    ue8m0_scales: bool = False

    def __post_init__(self) -> None:
        block = tuple(self.block)
        if len(block) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block):
            raise ValueError(f"FP8BlockFormat.block must be two positive integers (rows, columns), got {self.block!r}")
        object.__setattr__(self, "block", block)

    def scale_shape(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
        """Shape of the block-scale tensor of a 2-D weight of ``shape``.

        Args:
            shape: (out_features, in_features) of the weight.

        Returns:
            ``(ceil(out / block_rows), ceil(in / block_cols))``.
        """
        rows, cols = shape
        return math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1])


def fp8_format(config: Mapping[str, Any]) -> FP8BlockFormat | None:
    """The FP8 block format a checkpoint's ``config.json`` declares, if any.

    Args:
        config: Parsed ``config.json``.

    Returns:
        ``None`` when the config declares no ``quant_method: fp8`` (an unquantized checkpoint or
        another format), else the block format of the FP8 checkpoint. A missing ``fmt`` means
        e4m3, a missing ``scale_fmt`` float scales and a missing ``weight_block_size`` 128 x 128
        (transformers' defaults).

    Raises:
        CheckpointError: ``quantization_config`` is not an object, or an FP8 config's ``fmt``,
            ``scale_fmt``, ``weight_block_size`` or ``expert_dtype`` is not supported. The message
            names the key.

    Example:
        >>> fp8_format({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
        FP8BlockFormat(block=(128, 128))
    """
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        raise CheckpointError(f"config.json key quantization_config must be an object, got {type(qc).__name__}")
    if qc.get("quant_method") != "fp8":
        return None  # another format (e.g. a compressed-tensors artifact): not an FP8 base
    fmt = qc.get("fmt", "e4m3")
    if fmt not in SUPPORTED_FMTS:
        raise CheckpointError(
            f"config.json key quantization_config.fmt is {fmt!r}; supported: {', '.join(SUPPORTED_FMTS)}"
        )
    scale_fmt = qc.get("scale_fmt", "float")
    if scale_fmt not in SUPPORTED_SCALE_FMTS:
        raise CheckpointError(
            f"config.json key quantization_config.scale_fmt is {scale_fmt!r}; "
            f"supported: {', '.join(SUPPORTED_SCALE_FMTS)}"
        )
    expert_dtype(config)  # validated here; read by dsq.core.fp4.fp4_format
    block = qc.get("weight_block_size", [128, 128])
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise CheckpointError(
            f"config.json key quantization_config.weight_block_size is {block!r}; expected two positive "
            "integers [rows, columns] such as [128, 128] (per-tensor FP8 is not supported)"
        )
    return FP8BlockFormat(block=(block[0], block[1]), ue8m0_scales=scale_fmt == "ue8m0")


EXPERT_DTYPES: tuple[str, ...] = ("fp8", "fp4")
"""Values of ``expert_dtype`` (transformers' ``FineGrainedFP8Config``): routed experts FP8 like every other
Linear, or FP4 (DeepSeek-V4, :mod:`dsq.core.fp4`)."""


def expert_dtype(config: Mapping[str, Any]) -> tuple[str, str]:
    """Where an FP8 checkpoint's config declares its routed experts' format, and which format.

    DeepSeek-V4 writes ``"expert_dtype": "fp4"`` at the top of ``config.json``; V4.1 and transformers
    (``DeepseekV4Config.__post_init__`` moves the top-level key) keep it in ``quantization_config``,
    which wins when both are present.

    Args:
        config: Parsed ``config.json`` (its ``quantization_config``, if any, is an object).

    Returns:
        ``(key, value)``: the config key that declares it (for messages) and ``"fp8"`` (also when
        nothing declares it, transformers' default) or ``"fp4"``.

    Raises:
        CheckpointError: The declared value is not one of :data:`EXPERT_DTYPES`; the message names the key.
    """
    qc = config.get("quantization_config")
    if isinstance(qc, Mapping) and "expert_dtype" in qc:
        key, value = "quantization_config.expert_dtype", qc["expert_dtype"]
    elif "expert_dtype" in config:
        key, value = "expert_dtype", config["expert_dtype"]
    else:
        return "quantization_config.expert_dtype", "fp8"
    if value not in EXPERT_DTYPES:
        raise CheckpointError(f"config.json key {key} is {value!r}; supported: {', '.join(EXPERT_DTYPES)}")
    return key, value


def fp8_quantization_config(fmt: FP8BlockFormat) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` for ``fmt``, as DeepSeek writes it.

    Args:
        fmt: The block format.

    Returns:
        ``{"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [r, c]}``,
        with ``"scale_fmt": "ue8m0"`` for UE8M0 scales (DeepSeek-V4).
    """
    qc: dict[str, Any] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(fmt.block),
    }
    if fmt.ue8m0_scales:
        qc["scale_fmt"] = "ue8m0"
    return qc


def scale_name(weight_name: str) -> str:
    """Name of the block-scale tensor of an FP8 weight (``x.weight`` -> ``x.weight_scale_inv``)."""
    return weight_name + SCALE_SUFFIX


def scale_names(weight_name: str) -> tuple[str, ...]:
    """Every name the scales of ``weight_name`` may be stored under, in order of precedence.

    ``x.weight`` -> ``("x.weight_scale_inv", "x.scale")``: DeepSeek-V3's name, then DeepSeek-V4's
    (transformers reads both).
    """
    if weight_name.endswith(".weight"):
        return weight_name + SCALE_SUFFIX, weight_name.removesuffix(".weight") + MODULE_SCALE_SUFFIX
    return (weight_name + SCALE_SUFFIX,)


def find_scale(weight_name: str, names: Container[str]) -> str | None:
    """The name under which ``names`` holds the scales of ``weight_name`` (None: no scale)."""
    return next((name for name in scale_names(weight_name) if name in names), None)


def decode_scales(scale: torch.Tensor) -> torch.Tensor:
    """Scales as float32 multipliers, decoded by their dtype (as transformers' ``Fp8Dequantize``).

    Float scales are the multiplier; ``float8_e8m0fnu`` converts exactly (0xFF is NaN); ``uint8``
    holds raw UE8M0 exponents, ``2 ** (byte - 127)`` (0xFF becomes inf).

    Args:
        scale: A scale tensor of a dtype in ``_SCALE_DTYPES``.

    Returns:
        A float32 tensor of the same shape.
    """
    if scale.dtype == torch.uint8:
        return (scale.to(torch.float32) - 127.0).exp2()
    return scale.to(torch.float32)


def check_scales(described: str, scale: torch.Tensor, unit: str) -> torch.Tensor:
    """Decoded scales, refused when not of a scale dtype, non-finite or negative.

    Args:
        described: The scales and their weight, for messages (``"block scales x.scale of FP8 weight x.weight"``).
        scale: The stored scales.
        unit: What one scale covers, for messages (``"block"``, ``"group"``).

    Returns:
        The float32 scales (:func:`decode_scales`).

    Raises:
        CheckpointError: Starting with ``described``; names the first bad entry.
    """
    if scale.dtype not in _SCALE_DTYPES:
        raise CheckpointError(
            f"{described} have dtype {scale.dtype}; expected one of {', '.join(str(d) for d in _SCALE_DTYPES)}"
        )
    values = decode_scales(scale)
    bad = ~torch.isfinite(values) | (values < 0)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckpointError(
            f"{described} hold {int(bad.sum())} non-finite or negative value(s) "
            f"(first at {unit} {first}: {float(values[first])})"
        )
    return values


def is_scale_name(name: str) -> bool:
    """Whether ``name`` names a block-scale tensor."""
    return name.endswith(SCALE_SUFFIX)


def is_fp8_weight(name: str, dtype: torch.dtype | str | Mapping[str, Any]) -> bool:
    """Whether a stored tensor is an FP8 weight that needs dequantizing.

    Args:
        name: The tensor's name in the checkpoint.
        dtype: Its torch dtype, its safetensors dtype string (``"F8_E4M3"``) or its safetensors
            header entry (``{"dtype": ..., "shape": ..., "data_offsets": ...}``).

    Returns:
        True for an e4m3 tensor whose name is not itself a scale.
    """
    if isinstance(dtype, Mapping):
        dtype = dtype.get("dtype", "")
    fp8 = dtype == FP8_DTYPE if isinstance(dtype, torch.dtype) else dtype == FP8_SAFETENSORS_DTYPE
    return fp8 and not is_scale_name(name)


def _checked_scales(
    name: str, weight: torch.Tensor, scale_inv: torch.Tensor, fmt: FP8BlockFormat, label: str
) -> torch.Tensor:
    """The decoded float32 block scales, once weight and scales are checked."""
    if weight.dtype != FP8_DTYPE:
        raise CheckpointError(f"FP8 weight {name} has dtype {weight.dtype}; expected {FP8_DTYPE}")
    if weight.dim() != 2:
        raise CheckpointError(f"FP8 weight {name} has shape {tuple(weight.shape)}; expected a 2-D weight")
    expected = fmt.scale_shape(weight.shape)
    found = tuple(scale_inv.shape)
    if found != expected:
        raise CheckpointError(
            f"block scales {label} of FP8 weight {name} {tuple(weight.shape)} have shape {found}; "
            f"expected {expected} for {fmt.block[0]}x{fmt.block[1]} blocks"
        )
    values = check_scales(f"block scales {label} of FP8 weight {name}", scale_inv, "block")
    # e4m3fn has no infinities; its NaN is every exponent and mantissa bit set (0x7F / 0xFF).
    magnitude = weight.view(torch.uint8).bitwise_and(0x7F)
    if weight.numel() and int(magnitude.max()) == 0x7F:
        raise CheckpointError(f"FP8 weight {name} holds {int((magnitude == 0x7F).sum())} NaN value(s)")
    return values


def dequantize_fp8_blocks(
    name: str,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    fmt: FP8BlockFormat,
    dtype: torch.dtype = torch.bfloat16,
    *,
    scale_label: str | None = None,
) -> torch.Tensor:
    """The real weight of a block-scaled FP8 tensor: ``fp8 * scale_inv[block]``, computed in fp32.

    Vectorised over blocks; ragged edge blocks are handled. Working memory is one fp32 copy of
    the weight (multiplied in place) plus the scales repeated along rows (1/block_cols of it),
    plus the result when ``dtype`` is not float32.

    Args:
        name: The weight's name, used in error messages.
        weight: ``float8_e4m3fn`` tensor ``[out, in]``.
        scale_inv: Block scales ``[ceil(out / r), ceil(in / c)]``: float32 (bf16/fp16 accepted), or UE8M0
            (``float8_e8m0fnu``, or its exponent bytes as ``uint8``), see :func:`decode_scales`.
        fmt: The block format (r, c).
        dtype: dtype of the result.
        scale_label: Name of the scale tensor in messages (default ``name + "_scale_inv"``).

    Returns:
        The dequantized ``[out, in]`` weight in ``dtype``.

    Raises:
        CheckpointError: Wrong dtype or rank, a scale shape that does not fit the weight (the
            message gives the expected and found shapes), a non-finite or negative scale, or NaN
            weights. Every message names the tensor.

    Example:
        >>> q, s = quantize_fp8_blocks(torch.ones(130, 3), FP8BlockFormat())
        >>> dequantize_fp8_blocks("w", q, s, FP8BlockFormat()).unique().tolist()
        [1.0]
    """
    scales = _checked_scales(name, weight, scale_inv, fmt, scale_label or scale_name(name))
    rows, cols = weight.shape
    block_r, block_c = fmt.block
    full_c = cols // block_c  # column blocks of full width
    out = weight.to(torch.float32)  # (rows, cols)
    # Scales repeated over the rows of each block: (rows, column blocks), 1/block_c of the weight.
    row_scales = scales.repeat_interleave(block_r, dim=0)[:rows]
    if full_c:
        # View the full-width column blocks as (rows, full_c, block_c) and scale them in place.
        out[:, : full_c * block_c].unflatten(1, (full_c, block_c)).mul_(row_scales[:, :full_c, None])
    if full_c * block_c < cols:  # the ragged last column block
        out[:, full_c * block_c :].mul_(row_scales[:, full_c : full_c + 1])
    return out if dtype == torch.float32 else out.to(dtype)


def quantize_fp8_blocks(weight: torch.Tensor, fmt: FP8BlockFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to block-scaled FP8 e4m3, as DeepSeek's checkpoints store it.

    Each block's scale is its absolute maximum / 448 (the largest e4m3 value), so the block's
    largest element maps to +-448. An all-zero block gets scale 1 (its fp8 values are all zero,
    so the dequantized block is zero either way). Round to nearest (torch's fp32 -> e4m3 cast).
    With ``fmt.ue8m0_scales`` the scale is rounded up to a power of two (so no value exceeds 448;
    transformers' ``Fp8Quantize`` does the same) and returned as ``float8_e8m0fnu``.

    Args:
        weight: Floating-point ``[out, in]`` weight (any float dtype, computed in fp32).
        fmt: The block format.

    Returns:
        ``(fp8 weight [out, in] float8_e4m3fn, scale_inv [ceil(out/r), ceil(in/c)])``, the scales float32
        or, with ``fmt.ue8m0_scales``, ``float8_e8m0fnu``.

    Raises:
        ValueError: ``weight`` is not 2-D floating point, or holds non-finite values.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_fp8_blocks needs a 2-D floating-point weight, got {weight.dtype} {tuple(weight.shape)}")
    rows, cols = weight.shape
    block_r, block_c = fmt.block
    n_r, n_c = fmt.scale_shape(weight.shape)
    pad_c, pad_r = n_c * block_c - cols, n_r * block_r - rows
    if pad_c or pad_r:
        padded = torch.nn.functional.pad(weight.to(torch.float32), (0, pad_c, 0, pad_r))
    else:  # a private fp32 copy: it is divided in place below
        padded = weight.to(torch.float32, copy=True).contiguous()
    blocks = padded.view(n_r, block_r, n_c, block_c)
    amax = blocks.abs().amax(dim=(1, 3))  # (n_r, n_c)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("quantize_fp8_blocks: the weight holds non-finite values")
    scale = amax / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if fmt.ue8m0_scales:
        scale = power_of_two_at_least(scale)
    blocks.div_(scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    q = padded[:rows, :cols].to(FP8_DTYPE)
    return q, (scale.to(UE8M0_DTYPE) if fmt.ue8m0_scales else scale).contiguous()


def power_of_two_at_least(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ``>= scale`` (positive float32 in, float32 out), as UE8M0 stores a scale.

    Rounding up keeps every ``value / scale`` within the format's range. Computed from the exponent
    bits (``frexp``), so it is exact where ``2 ** ceil(log2(x))`` may be off by one near powers of two.
    """
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2**exponent, 0.5 <= mantissa < 1
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)  # an exact power of two stays
    return torch.ldexp(torch.ones_like(scale), exponent)
