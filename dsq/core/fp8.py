"""FP8 (e4m3) block-scaled weights, the format of the official DeepSeek-V3/R1 checkpoints.

In those checkpoints every Linear weight inside the decoder layers (attention projections, dense
and shared-expert MLPs, every routed expert) is stored as ``float8_e4m3fn`` next to a float32
``<name>_scale_inv`` tensor (``...proj.weight`` -> ``...proj.weight_scale_inv``) of shape
``[ceil(out / 128), ceil(in / 128)]``. The real weight of each 128 x 128 block is the fp8 value times
the block's scale; blocks on the right and bottom edges are smaller when a dimension is not a
multiple of 128. ``config.json`` declares the format::

    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                            "quant_method": "fp8", "weight_block_size": [128, 128]}

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
from collections.abc import Mapping
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

SUPPORTED_FMTS: tuple[str, ...] = ("e4m3",)
SUPPORTED_SCALE_FMTS: tuple[str, ...] = ("float",)
_SCALE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class FP8BlockFormat:
    """Block-scaled FP8 (e4m3) weights.

    Attributes:
        block: (rows, columns) of one scaling block; edge blocks may be smaller.
    """

    block: tuple[int, int] = (128, 128)

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
        e4m3 and a missing ``weight_block_size`` means 128 x 128 (transformers' defaults).

    Raises:
        CheckpointError: ``quantization_config`` is not an object, or an FP8 config's ``fmt``,
            ``scale_fmt`` or ``weight_block_size`` is not supported. The message names the key.

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
    return FP8BlockFormat(block=(block[0], block[1]))


def fp8_quantization_config(fmt: FP8BlockFormat) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` for ``fmt``, as DeepSeek writes it.

    Args:
        fmt: The block format.

    Returns:
        ``{"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [r, c]}``.
    """
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(fmt.block),
    }


def scale_name(weight_name: str) -> str:
    """Name of the block-scale tensor of an FP8 weight (``x.weight`` -> ``x.weight_scale_inv``)."""
    return weight_name + SCALE_SUFFIX


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


def _check_inputs(name: str, weight: torch.Tensor, scale_inv: torch.Tensor, fmt: FP8BlockFormat) -> None:
    if weight.dtype != FP8_DTYPE:
        raise CheckpointError(f"FP8 weight {name} has dtype {weight.dtype}; expected {FP8_DTYPE}")
    if weight.dim() != 2:
        raise CheckpointError(f"FP8 weight {name} has shape {tuple(weight.shape)}; expected a 2-D weight")
    expected = fmt.scale_shape(weight.shape)
    found = tuple(scale_inv.shape)
    if found != expected:
        raise CheckpointError(
            f"block scales {scale_name(name)} of FP8 weight {name} {tuple(weight.shape)} have shape {found}; "
            f"expected {expected} for {fmt.block[0]}x{fmt.block[1]} blocks"
        )
    if scale_inv.dtype not in _SCALE_DTYPES:
        raise CheckpointError(
            f"block scales {scale_name(name)} of FP8 weight {name} have dtype {scale_inv.dtype}; "
            f"expected one of {', '.join(str(d) for d in _SCALE_DTYPES)}"
        )
    bad = ~torch.isfinite(scale_inv) | (scale_inv < 0)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckpointError(
            f"block scales {scale_name(name)} of FP8 weight {name} hold {int(bad.sum())} non-finite or "
            f"negative value(s) (first at block {first}: {float(scale_inv[first])})"
        )
    # e4m3fn has no infinities; its NaN is every exponent and mantissa bit set (0x7F / 0xFF).
    magnitude = weight.view(torch.uint8).bitwise_and(0x7F)
    if weight.numel() and int(magnitude.max()) == 0x7F:
        raise CheckpointError(f"FP8 weight {name} holds {int((magnitude == 0x7F).sum())} NaN value(s)")


def dequantize_fp8_blocks(
    name: str,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    fmt: FP8BlockFormat,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The real weight of a block-scaled FP8 tensor: ``fp8 * scale_inv[block]``, computed in fp32.

    Vectorised over blocks; ragged edge blocks are handled. Working memory is one fp32 copy of
    the weight (multiplied in place) plus the scales repeated along rows (1/block_cols of it),
    plus the result when ``dtype`` is not float32.

    Args:
        name: The weight's name, used in error messages.
        weight: ``float8_e4m3fn`` tensor ``[out, in]``.
        scale_inv: Block scales ``[ceil(out / r), ceil(in / c)]`` (float32; bf16/fp16 accepted).
        fmt: The block format (r, c).
        dtype: dtype of the result.

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
    _check_inputs(name, weight, scale_inv, fmt)
    rows, cols = weight.shape
    block_r, block_c = fmt.block
    full_c = cols // block_c  # column blocks of full width
    out = weight.to(torch.float32)  # (rows, cols)
    # Scales repeated over the rows of each block: (rows, column blocks), 1/block_c of the weight.
    row_scales = scale_inv.to(torch.float32).repeat_interleave(block_r, dim=0)[:rows]
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

    Args:
        weight: Floating-point ``[out, in]`` weight (any float dtype, computed in fp32).
        fmt: The block format.

    Returns:
        ``(fp8 weight [out, in] float8_e4m3fn, scale_inv [ceil(out/r), ceil(in/c)] float32)``.

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
    blocks.div_(scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    q = padded[:rows, :cols].to(FP8_DTYPE)
    return q, scale.contiguous()
