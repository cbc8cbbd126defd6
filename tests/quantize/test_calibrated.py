"""Calibrated PTQ: GPTQ / AWQ math, balance mappings, the layer-sequential driver, W8A8 and MoE calibration."""
import copy

import pytest
import torch
from torch import nn

from dsq.quantize.artifact_save import save_quantized_model
from dsq.core.loading import load_checkpoint
from dsq.core.errors import QuantizationError
from dsq.quantize import (
    AWQConfig, GPTQConfig, PerChannel, PerGroup, QuantExperts, QuantLinear, RTNConfig, W8A8Config, WeightScheme,
    quantize_, quantize_rtn,
)
from dsq.quantize.awq import search_clip, search_scale
from dsq.quantize.gptq import gptq_quantize
from dsq.quantize.stats import InputStats
from dsq.quantize.mappings import Balance, fold
from dsq.quantize.primitives import dequantize_weight, quantize_with_qparams
from dsq.quantize.w8a8 import StaticPerTensor, W8A8Experts, W8A8Linear
from dsq.eval.reload import transformers_reload_check
from dsq.tools.testing import fold_every_mapping, hessian_of

ARCHS = ["llama", "qwen2", "deepseek_v3", "deepseek_v2"]


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scale = torch.logspace(-1, 1, d)[torch.randperm(d, generator=g)]  # uneven channel magnitudes
    return (torch.randn(n, d, generator=g) @ mix) * scale


def output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float((x @ w.t() - x @ wq.t()).pow(2).mean())


# ----------------------------------------------------------------------------- GPTQ math


def test_collected_hessian_matches_batch_formula_and_weights():
    x = torch.randn(300, 16)
    stats = InputStats()
    for chunk in x.split(70):
        stats.add(chunk, hessian=True, sample_rows=0)
    assert stats.count == 300
    torch.testing.assert_close(stats.hessian, 2 / 300 * x.t() @ x, rtol=1e-5, atol=1e-6)
    w = torch.rand(300)
    weighted = InputStats()
    weighted.add(x, hessian=True, sample_rows=0, weights=w)
    torch.testing.assert_close(weighted.hessian, 2 / w.sum() * (x * w[:, None]).t() @ x, rtol=1e-5, atol=1e-6)
    assert weighted.count == pytest.approx(float(w.sum()))
    assert hessian_of(x, w).equal(weighted.hessian)


@pytest.mark.parametrize("scheme", [
    WeightScheme(4, PerGroup(32), True),
    WeightScheme(4, PerGroup(32), False),
    WeightScheme(4, PerChannel(), True),
    WeightScheme(8, PerChannel(), True),
    WeightScheme(4, PerGroup(48), True),  # ragged last group (128 = 2 x 48 + 32)
])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_its_inputs_and_is_a_valid_weight(scheme, act_order):
    torch.manual_seed(0)
    x = correlated_inputs(2048, 128)
    w = torch.randn(64, 128)
    H = hessian_of(x)
    result = gptq_quantize(w, H, scheme, act_order=act_order, block_size=32)
    qw = result.qweight
    assert qw.qweight.dtype == torch.int8
    assert int(qw.qweight.min()) >= scheme.qmin and int(qw.qweight.max()) <= scheme.qmax
    assert qw.scale.shape == (64, scheme.granularity.num_groups(128))
    assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()
    # a plain group-wise weight: re-rounding its own dequantized values with its scales is the identity
    dq = dequantize_weight(qw)
    again = quantize_with_qparams(dq, qw.scale, qw.zero, scheme)
    assert torch.equal(again.qweight, qw.qweight)
    rtn = dequantize_weight(quantize_rtn(w, scheme))
    assert output_error(x, w, dq) < 0.8 * output_error(x, w, rtn)


def test_gptq_dead_input_columns_are_zeroed():
    x = correlated_inputs(512, 64)
    x[:, 5] = 0
    H = hessian_of(x)
    qw = gptq_quantize(torch.randn(16, 64), H, WeightScheme(4, PerGroup(32))).qweight
    assert (qw.qweight[:, 5] == 0).all()


# ----------------------------------------------------------------------------- AWQ math


def test_awq_scale_search_never_worse_than_unscaled_and_helps_outlier_channels():
    torch.manual_seed(0)
    x = torch.randn(1024, 128)
    x[:, :4] *= 30  # salient channels
    w = torch.randn(96, 128) * 0.05
    scheme = WeightScheme(4, PerGroup(32))
    found = search_scale(x, x.abs().mean(0), [w], scheme, grid=20, duo_scaling=False)
    assert found.loss <= found.loss_unscaled
    assert found.loss < 0.9 * found.loss_unscaled
    assert torch.isfinite(found.s).all() and (found.s > 0).all()


def test_awq_clip_reduces_output_error():
    torch.manual_seed(0)
    x = torch.randn(512, 128)
    w = torch.randn(64, 128)
    w[:, 7] *= 8  # a heavy-tailed column
    scheme = WeightScheme(4, PerGroup(64))
    clipped = search_clip(w, x, scheme)
    assert (clipped.abs() <= w.abs() + 1e-6).all()
    err_clip = output_error(x, w, dequantize_weight(quantize_rtn(clipped, scheme)))
    err_rtn = output_error(x, w, dequantize_weight(quantize_rtn(w, scheme)))
    assert err_clip < 0.95 * err_rtn, (err_clip, err_rtn)  # measured 0.89x; no clipping gives 1.0x


# ----------------------------------------------------------------------------- mappings


@pytest.mark.parametrize("arch", ARCHS)
def test_balance_mappings_fold_exactly(tiny_checkpoint, arch):
    """Every mapping of the table, folded with a random scale, leaves the fp model's logits unchanged."""
    model = load_checkpoint(tiny_checkpoint(arch)).model
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    applied = [m.smooth for m in fold_every_mapping(model, torch.Generator().manual_seed(1))]
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert (out - ref).abs().max() < 1e-4
    if arch.startswith("deepseek"):
        assert "self_attn.kv_a_layernorm" in applied and "mlp.experts" in applied
    else:
        assert "input_layernorm" in applied and "mlp.up_proj" in applied


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fold_into_linear_rows_with_bias(dtype, tol):
    """A Linear (with bias) as the smooth op, in fp32 and bf16: the scale is applied in fp32."""
    torch.manual_seed(0)
    block = nn.Module()
    block.up, block.down = nn.Linear(64, 96), nn.Linear(96, 64)
    block = block.to(dtype)
    x = torch.randn(16, 64, dtype=dtype)
    with torch.no_grad():
        ref = block.down(block.up(x)).float()
        fold(block, Balance("up", ("down",)), torch.rand(96) * 4 + 0.25)
        out = block.down(block.up(x)).float()
    assert float((out - ref).abs().max() / ref.abs().max()) < tol


# ----------------------------------------------------------------------------- whole models


def calibration_ids(vocab: int, samples: int = 8, seq: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (samples, seq), generator=torch.Generator().manual_seed(123))


def relative_error(model, ref_logits, ids) -> float:
    with torch.no_grad():
        out = model(input_ids=ids).logits
    return float((out - ref_logits).norm() / ref_logits.norm())


# Relative logit error on the calibration tokens, as a multiple of RTN's, measured (int4 g32):
# GPTQ 0.50 llama / 0.52 qwen2 / 0.63 deepseek_v3; AWQ 0.89 / 0.89 / 0.994. These random models
# have no activation outliers, so AWQ gains little here (deepseek_v3: only its range search, never
# worse than RTN); its gain where outliers exist is tested in test_awq_outliers.py.
MAX_ERROR_VS_RTN = {
    **{(GPTQConfig, arch): 0.75 for arch in ("llama", "qwen2", "deepseek_v3")},
    (AWQConfig, "llama"): 0.95,
    (AWQConfig, "qwen2"): 0.95,
    (AWQConfig, "deepseek_v3"): 1.0,
}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "deepseek_v3"])
@pytest.mark.parametrize("config_type", [GPTQConfig, AWQConfig])
def test_calibrated_weight_methods_on_tiny_models(tiny_checkpoint, tmp_path, arch, config_type):
    loaded = load_checkpoint(tiny_checkpoint(arch))
    model = loaded.model
    ids = calibration_ids(model.config.vocab_size)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    scheme = WeightScheme(4, PerGroup(32))
    rtn = copy.deepcopy(model)
    quantize_(rtn, RTNConfig(scheme), progress=False)
    report = quantize_(model, config_type(scheme, batch_size=4), calibration=ids, progress=False)

    kinds = {type(m) for m in model.modules()}
    assert QuantLinear in kinds
    assert not any(isinstance(m, nn.Linear) and not n.endswith("lm_head") for n, m in model.named_modules())
    assert all(r.quantized for r in report.modules if not r.name.endswith("lm_head"))
    if arch == "deepseek_v3":
        assert QuantExperts in kinds
        assert report.calibration["expert_routed_tokens"]
    err, err_rtn = relative_error(model, ref, ids), relative_error(rtn, ref, ids)
    assert err < MAX_ERROR_VS_RTN[config_type, arch] * err_rtn, (err, err_rtn)

    (tmp_path / "art").mkdir()
    save_quantized_model(model, loaded.tokenizer, tmp_path / "art")
    check = transformers_reload_check(tmp_path / "art", model)
    assert check.loaded and check.passed, check


def test_calibration_is_required():
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(QuantizationError, match="needs calibration data"):
        quantize_(model, GPTQConfig(), progress=False)


def starve_expert(model, expert: int = 0) -> int:
    """Make the router never pick ``expert`` (DeepSeek-V3's selection bias); returns the MoE layer count."""
    n = 0
    for name, module in model.named_modules():
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            with torch.no_grad():
                bias[expert] = -1e4
            n += 1
    return n


@pytest.mark.parametrize("config", [
    GPTQConfig(WeightScheme(4, PerGroup(32)), batch_size=4),
    AWQConfig(WeightScheme(4, PerGroup(32)), batch_size=4),
    W8A8Config(StaticPerTensor(), smoothquant_alpha=0.5, batch_size=4),
], ids=["gptq", "awq", "w8a8-static-sq"])
def test_expert_without_routed_tokens_gets_finite_scales_and_is_reported(tiny_deepseek_v3, tmp_path, config):
    loaded = load_checkpoint(tiny_deepseek_v3)
    model = loaded.model
    moe_layers = starve_expert(model, 0)
    assert moe_layers > 0
    report = quantize_(model, config, calibration=calibration_ids(model.config.vocab_size), progress=False)
    starved = report.calibration["experts_without_routed_tokens"]
    assert len(starved) == moe_layers and all(0 in experts for experts in starved.values())
    assert all(count[0] == 0 for count in report.calibration["expert_routed_tokens"].values())
    assert any("received no routed calibration token" in note for note in report.notes)
    experts = [m for m in model.modules() if isinstance(m, (QuantExperts, W8A8Experts))]
    assert len(experts) == moe_layers
    for m in model.modules():
        for name, buf in m.named_buffers(recurse=False):
            if "scale" in name:
                assert torch.isfinite(buf).all() and (buf > 0).all(), name
    (tmp_path / "art").mkdir()
    save_quantized_model(model, loaded.tokenizer, tmp_path / "art")  # the writer refuses non-finite scales


@pytest.mark.parametrize("arch", ["llama", "qwen2", "deepseek_v3"])
def test_w8a8_smoothquant_on_tiny_models(tiny_checkpoint, arch):
    model = load_checkpoint(tiny_checkpoint(arch)).model
    ids = calibration_ids(model.config.vocab_size)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    report = quantize_(model, W8A8Config(StaticPerTensor(), smoothquant_alpha=0.5, batch_size=4), calibration=ids, progress=False)
    assert report.method == "w8a8"
    assert report.calibration["modules"], "no smoothing was applied"
    assert any(isinstance(m, W8A8Linear) for m in model.modules())
    assert relative_error(model, ref, ids) < 0.08


def test_bf16_model_gptq_statistics_in_fp32(tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint("llama"), dtype=torch.bfloat16)
    model = loaded.model
    ids = calibration_ids(model.config.vocab_size)
    report = quantize_(model, GPTQConfig(WeightScheme(4, PerGroup(32)), batch_size=4), calibration=ids, progress=False)
    assert report.quantized_params > 0
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
