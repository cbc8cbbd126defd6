"""FP8 block-scaled weights: dequantization against a float64 block loop, round trip, bad inputs, config."""
from __future__ import annotations

import math

import pytest
import torch

from dsq.core.errors import CheckpointError
from dsq.core.fp8 import (
    FP8BlockFormat,
    dequantize_fp8_blocks,
    expert_dtype,
    find_scale,
    fp8_format,
    fp8_quantization_config,
    is_fp8_weight,
    quantize_fp8_blocks,
    scale_name,
    scale_names,
)

OFFICIAL_QC = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}

SHAPES_AND_BLOCKS = [
    ((300, 200), (128, 128)),  # ragged last row block (44 rows) and column block (72 columns)
    ((256, 384), (128, 128)),  # no ragged edge
    ((5, 3), (128, 128)),  # smaller than one block
    ((129, 1), (128, 128)),
    ((100, 70), (64, 32)),  # non-square blocks, ragged both ways
]


def reference_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Independent reference: one block at a time, in float64."""
    rows, cols = weight.shape
    w = weight.to(torch.float64)
    out = torch.empty(rows, cols, dtype=torch.float64)
    for i in range(math.ceil(rows / block[0])):
        for j in range(math.ceil(cols / block[1])):
            r = slice(i * block[0], (i + 1) * block[0])
            c = slice(j * block[1], (j + 1) * block[1])
            out[r, c] = w[r, c] * float(scale_inv[i, j])
    return out


def random_fp8(shape: tuple[int, int], block: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random fp8 codes (every finite e4m3 value is possible) and random positive block scales."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x42  # no NaN codes
    weight = codes.view(torch.float8_e4m3fn)
    n = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    scale = torch.exp(torch.randn(n, generator=gen) * 3).to(torch.float32)
    return weight, scale


def blockwise_weight(shape: tuple[int, int], block: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Normal weights with a different magnitude per block (1e-4 .. 1e2) and one all-zero block."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    n = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    magnitudes = 10.0 ** torch.randint(-4, 3, n, generator=gen).to(torch.float32)
    w *= magnitudes.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]
    w[: block[0], : block[1]] = 0.0
    return w


def expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    return scale.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


@pytest.mark.parametrize(("shape", "block"), SHAPES_AND_BLOCKS)
def test_dequantize_matches_float64_block_loop(shape, block):
    weight, scale = random_fp8(shape, block)
    fmt = FP8BlockFormat(block)
    ref = reference_dequantize(weight, scale, block)
    got = dequantize_fp8_blocks("w", weight, scale, fmt, dtype=torch.float32)
    assert got.dtype == torch.float32 and got.shape == shape
    # An e4m3 value has 4 significant bits and an fp32 scale 24, so the exact product fits in
    # float64 and the fp32 result is that product correctly rounded: equal to ref -> fp32.
    assert torch.equal(got, ref.to(torch.float32))
    got_bf16 = dequantize_fp8_blocks("w", weight, scale, fmt)  # default dtype
    assert got_bf16.dtype == torch.bfloat16
    assert torch.equal(got_bf16, ref.to(torch.float32).to(torch.bfloat16))


@pytest.mark.parametrize(("shape", "block"), SHAPES_AND_BLOCKS)
def test_quantize_dequantize_round_trip_bound(shape, block):
    fmt = FP8BlockFormat(block)
    w = blockwise_weight(shape, block)
    before = w.clone()
    q, scale = quantize_fp8_blocks(w, fmt)
    assert torch.equal(w, before), "quantize_fp8_blocks modified its input"
    assert q.dtype == torch.float8_e4m3fn and q.shape == shape
    assert scale.dtype == torch.float32 and tuple(scale.shape) == fmt.scale_shape(shape)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    d = dequantize_fp8_blocks("w", q, scale, fmt, dtype=torch.float32)
    s = expand(scale, shape, block)
    # Bound asserted, per element: |deq - w| <= 2^-4 |w| + 2^-10 s, s = block amax / 448.
    # e4m3 keeps 3 mantissa bits, so round-to-nearest of the normal values x = w / s
    # (2^-6 <= |x| <= 448) errs by at most half a unit in the last place, 2^-4 |x|; subnormals
    # (|x| < 2^-6, spacing 2^-9) err by at most 2^-10. The factor 1 + 1e-5 covers fp32 rounding of w / s.
    bound = (2.0**-4 * w.abs() + 2.0**-10 * s) * (1 + 1e-5)
    assert bool(((d - w).abs() <= bound).all()), float(((d - w).abs() / bound).max())
    # Every block's largest magnitude maps to +-448 and comes back to fp32 rounding.
    amax_ref = w.abs().amax()
    assert float((d.abs().amax() - amax_ref).abs()) <= 2e-7 * float(amax_ref)
    # The all-zero block: scale 1 (finite), values exactly zero.
    assert float(scale[0, 0]) == 1.0
    assert bool((d[: block[0], : block[1]] == 0).all())


def test_round_trip_accepts_bf16_input_and_is_idempotent():
    fmt = FP8BlockFormat()
    w = blockwise_weight((300, 200), (128, 128), seed=1).to(torch.bfloat16)
    q, scale = quantize_fp8_blocks(w, fmt)
    d = dequantize_fp8_blocks("w", q, scale, fmt, dtype=torch.float32)
    # Quantizing an already-quantized weight again reproduces it (the amax stays the same).
    q2, scale2 = quantize_fp8_blocks(d, fmt)
    assert torch.equal(scale2, scale)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))


def test_dequantize_does_not_modify_inputs():
    weight, scale = random_fp8((300, 200), (128, 128))
    codes, scale_before = weight.view(torch.uint8).clone(), scale.clone()
    dequantize_fp8_blocks("w", weight, scale, FP8BlockFormat(), dtype=torch.float32)
    assert torch.equal(weight.view(torch.uint8), codes) and torch.equal(scale, scale_before)


# --------------------------------------------------------------------------- bad inputs

NAME = "model.layers.3.mlp.experts.7.up_proj.weight"


def test_wrong_scale_shape_names_tensor_and_shapes():
    weight, scale = random_fp8((300, 200), (128, 128))
    with pytest.raises(CheckpointError) as info:
        dequantize_fp8_blocks(NAME, weight, scale[:2], FP8BlockFormat())
    message = str(info.value)
    assert NAME in message and scale_name(NAME) in message
    assert "(3, 2)" in message and "(2, 2)" in message  # expected, found


def test_scale_shape_of_a_different_block_size_is_refused():
    weight, scale = random_fp8((300, 200), (64, 64))
    with pytest.raises(CheckpointError, match=r"expected \(3, 2\) for 128x128 blocks"):
        dequantize_fp8_blocks(NAME, weight, scale, FP8BlockFormat())


def test_wrong_weight_dtype_names_tensor():
    _, scale = random_fp8((300, 200), (128, 128))
    with pytest.raises(CheckpointError, match=rf"{NAME}.*bfloat16.*float8_e4m3fn"):
        dequantize_fp8_blocks(NAME, torch.zeros(300, 200, dtype=torch.bfloat16), scale, FP8BlockFormat())


def test_non_2d_weight_is_refused():
    weight = torch.zeros(2, 3, 4).to(torch.float8_e4m3fn)
    with pytest.raises(CheckpointError, match=rf"{NAME}.*\(2, 3, 4\)"):
        dequantize_fp8_blocks(NAME, weight, torch.ones(1, 1), FP8BlockFormat())


def test_integer_scale_dtype_is_refused():
    weight, _ = random_fp8((300, 200), (128, 128))
    with pytest.raises(CheckpointError, match=rf"{scale_name(NAME)}.*int32"):
        dequantize_fp8_blocks(NAME, weight, torch.ones(3, 2, dtype=torch.int32), FP8BlockFormat())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_scale_names_tensor_and_block(bad):
    weight, scale = random_fp8((300, 200), (128, 128))
    scale[2, 1] = bad
    with pytest.raises(CheckpointError) as info:
        dequantize_fp8_blocks(NAME, weight, scale, FP8BlockFormat())
    assert NAME in str(info.value) and "(2, 1)" in str(info.value)


def test_nan_fp8_weight_is_refused():
    weight, scale = random_fp8((300, 200), (128, 128))
    codes = weight.view(torch.uint8).clone()
    codes[10, 10], codes[299, 199] = 0x7F, 0xFF  # +NaN, -NaN
    with pytest.raises(CheckpointError, match=rf"{NAME} holds 2 NaN"):
        dequantize_fp8_blocks(NAME, codes.view(torch.float8_e4m3fn), scale, FP8BlockFormat())


def test_quantize_refuses_non_finite_and_non_2d():
    with pytest.raises(ValueError, match="non-finite"):
        quantize_fp8_blocks(torch.tensor([[1.0, float("inf")]]), FP8BlockFormat())
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8_blocks(torch.ones(4), FP8BlockFormat())


@pytest.mark.parametrize("block", [(128,), (0, 128), (128, -1), (1.5, 2), (True, 128)])
def test_block_format_validation(block):
    with pytest.raises(ValueError, match="two positive integers"):
        FP8BlockFormat(block)


# --------------------------------------------------------------------------- config


def test_fp8_format_without_quantization_config_is_none():
    assert fp8_format({"model_type": "deepseek_v3"}) is None
    assert fp8_format({"model_type": "deepseek_v3", "quantization_config": None}) is None


def test_fp8_format_reads_the_official_config():
    assert fp8_format({"quantization_config": OFFICIAL_QC}) == FP8BlockFormat((128, 128))
    assert fp8_quantization_config(FP8BlockFormat()) == OFFICIAL_QC
    odd = {**OFFICIAL_QC, "weight_block_size": [64, 32]}
    assert fp8_format({"quantization_config": odd}) == FP8BlockFormat((64, 32))
    # transformers' FineGrainedFP8Config defaults: no fmt -> e4m3, no block -> 128 x 128.
    assert fp8_format({"quantization_config": {"quant_method": "fp8"}}) == FP8BlockFormat()
    # other formats are not FP8 bases
    assert fp8_format({}) is None
    assert fp8_format({"quantization_config": {**OFFICIAL_QC, "quant_method": "compressed-tensors"}}) is None


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"fmt": "e5m2"}, "quantization_config.fmt"),
        ({"scale_fmt": "e5m2"}, "quantization_config.scale_fmt"),
        ({"expert_dtype": "int4"}, "quantization_config.expert_dtype"),
        ({"weight_block_size": [128]}, "quantization_config.weight_block_size"),
        ({"weight_block_size": [128, 0]}, "quantization_config.weight_block_size"),
        ({"weight_block_size": None}, "quantization_config.weight_block_size"),
        ({"weight_block_size": "128x128"}, "quantization_config.weight_block_size"),
        ({"weight_block_size": [128.0, 128]}, "quantization_config.weight_block_size"),
    ],
)
def test_fp8_format_unsupported_values_name_the_key(change, key):
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        fp8_format({"quantization_config": {**OFFICIAL_QC, **change}})


def test_fp8_format_reads_ue8m0_scales_and_a_top_level_expert_dtype():
    v4 = {**OFFICIAL_QC, "scale_fmt": "ue8m0"}
    assert fp8_format({"quantization_config": v4}) == FP8BlockFormat((128, 128), ue8m0_scales=True)
    assert fp8_quantization_config(FP8BlockFormat(ue8m0_scales=True)) == v4
    # DeepSeek-V4 declares its FP4 experts at the top of config.json; V4.1 inside quantization_config.
    assert expert_dtype({"expert_dtype": "fp4", "quantization_config": v4}) == ("expert_dtype", "fp4")
    inside = {"expert_dtype": "fp8", "quantization_config": {**v4, "expert_dtype": "fp4"}}
    assert expert_dtype(inside) == ("quantization_config.expert_dtype", "fp4")
    assert expert_dtype({"quantization_config": v4})[1] == "fp8"
    with pytest.raises(CheckpointError, match=r"config.json key expert_dtype is 'nf4'"):
        fp8_format({"expert_dtype": "nf4", "quantization_config": v4})


def test_ue8m0_round_trip_uses_power_of_two_scales():
    fmt = FP8BlockFormat((128, 128), ue8m0_scales=True)
    w = blockwise_weight((300, 200), (128, 128), seed=2)
    q, scale = quantize_fp8_blocks(w, fmt)
    assert scale.dtype == torch.float8_e8m0fnu and tuple(scale.shape) == (3, 2)
    s = scale.to(torch.float32)
    amax = torch.tensor([[float(w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].abs().max()) for j in range(2)] for i in range(3)])
    # the smallest power of two at or above amax / 448 (1 for the all-zero block)
    expected = torch.where(amax > 0, torch.exp2(torch.ceil(torch.log2(amax / 448))), torch.ones_like(amax))
    assert torch.equal(s, expected)
    d = dequantize_fp8_blocks("w", q, scale, fmt, dtype=torch.float32)
    assert torch.equal(d, dequantize_fp8_blocks("w", q, scale.view(torch.uint8), fmt, dtype=torch.float32))
    bound = (2.0**-4 * w.abs() + 2.0**-10 * expand(s, (300, 200), (128, 128))) * (1 + 1e-5)
    assert bool(((d - w).abs() <= bound).all())


def test_ue8m0_nan_scale_names_the_scale_tensor():
    weight, _ = random_fp8((300, 200), (128, 128))
    scale = torch.full((3, 2), 127, dtype=torch.uint8)
    scale[1, 0] = 0xFF  # NaN in float8_e8m0fnu
    with pytest.raises(CheckpointError, match=r"block scales x\.scale of FP8 weight x\.weight hold 1 .*\(1, 0\)"):
        dequantize_fp8_blocks("x.weight", weight, scale.view(torch.float8_e8m0fnu), FP8BlockFormat(), scale_label="x.scale")


def test_fp8_format_refuses_a_non_object():
    with pytest.raises(CheckpointError, match="quantization_config must be an object"):
        fp8_format({"quantization_config": "fp8"})


def test_helpers():
    assert scale_name("a.weight") == "a.weight_scale_inv"
    assert is_fp8_weight("a.weight", torch.float8_e4m3fn)
    assert is_fp8_weight("a.weight", "F8_E4M3")
    assert is_fp8_weight("a.weight", {"dtype": "F8_E4M3", "shape": [2, 2], "data_offsets": [0, 4]})
    assert not is_fp8_weight("a.weight", "BF16")
    assert not is_fp8_weight("a.weight", torch.bfloat16)
    assert not is_fp8_weight("a.weight_scale_inv", "F8_E4M3")
    assert FP8BlockFormat().scale_shape((576, 7168)) == (5, 56)  # DeepSeek-V3's kv_a_proj_with_mqa
    assert scale_names("a.wq_a.weight") == ("a.wq_a.weight_scale_inv", "a.wq_a.scale")
    assert find_scale("a.weight", {"a.scale", "b.weight_scale_inv"}) == "a.scale"
    assert find_scale("b.weight", {"a.scale"}) is None
