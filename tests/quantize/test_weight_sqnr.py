"""Per-module weight SQNR recorded at swap time by every weight method (RTN, GPTQ, AWQ, W8A8)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from dsq.core.checkpoint import bundled_model_path
from dsq.core.loading import load_checkpoint
from dsq.quantize import (
    AWQConfig, GPTQConfig, PerChannel, PerGroup, RTNConfig, W8A8Config, WeightScheme, quantize_,
)
from dsq.quantize.primitives import quantize_rtn
from dsq.quantize.w8a8 import DynamicPerToken, StaticPerTensor


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Block(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)


class _FusedExperts(nn.Module):
    """The shape of transformers 5's fused MoE experts: gate_up [E, 2I, H], down [E, H, I]."""

    def __init__(self, experts: int = 3, hidden: int = 8, inter: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inter, hidden, generator=g))
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inter, generator=g))
        with torch.no_grad():  # expert 1's down rows: one large value, the rest round to 0 in int4 (~18 dB)
            self.down_proj[1] = torch.tensor([1.0] + [0.07] * (inter - 1))
        self.act_fn = nn.SiLU()


class _MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = _FusedExperts()


def _by_hand(rows: list[list[float]], qmax: int) -> float:
    """Symmetric per-row round-to-nearest, then 10 log10(sum w^2 / sum (w - w_hat)^2), in plain Python."""
    signal = noise = 0.0
    for row in rows:
        scale = max(abs(w) for w in row) / qmax
        for w in row:
            w_hat = max(-qmax - 1, min(qmax, round(w / scale))) * scale
            signal += w * w
            noise += (w - w_hat) ** 2
    return 10 * math.log10(signal / noise)


def test_sqnr_of_a_known_weight_equals_the_hand_computation() -> None:
    rows = [[1.0, -0.45, 0.26, 0.1], [0.3, 0.6, -0.9, 0.05]]
    # by hand, int4 (qmax 7): row 0 scale 1/7 -> q = [7, -3, 2, 1]; row 1 scale 0.9/7 -> q = [2, 5, -7, 0]
    expected = 10 * math.log10(
        sum(w * w for r in rows for w in r)
        / ((0.45 - 3 / 7) ** 2 + (0.26 - 2 / 7) ** 2 + (0.1 - 1 / 7) ** 2
           + (0.3 - 2 * 0.9 / 7) ** 2 + (0.6 - 5 * 0.9 / 7) ** 2 + 0.05 ** 2)
    )
    assert expected == pytest.approx(_by_hand(rows, 7), abs=1e-9)
    model = _Block(torch.tensor(rows))
    report = quantize_(model, RTNConfig(WeightScheme(4, PerChannel())), progress=False)
    (record,) = report.modules
    assert record.name == "proj" and record.quantized and record.expert_sqnr_db is None
    assert record.sqnr_db == pytest.approx(expected, abs=1e-4)
    int8 = quantize_(_Block(torch.tensor(rows)), RTNConfig(WeightScheme(8, PerChannel())), progress=False).modules[0]
    assert int8.sqnr_db == pytest.approx(_by_hand(rows, 127), abs=1e-3)
    assert report.to_dict()["modules"][0]["sqnr_db"] == record.sqnr_db


def test_fused_experts_pool_tensors_and_keep_the_worse_projection_per_expert() -> None:
    model = _MoE()
    gate_up, down = model.experts.gate_up_proj.detach().clone(), model.experts.down_proj.detach().clone()
    scheme = WeightScheme(4, PerGroup(4))
    report = quantize_(model, RTNConfig(scheme), progress=False)
    (record,) = report.modules
    assert record.kind == "experts"

    def parts(w: torch.Tensor) -> tuple[float, float]:  # (noise, signal), dequantized by hand: q * scale
        qw = quantize_rtn(w, scheme)
        w_hat = qw.qweight.float() * qw.scale.repeat_interleave(4, dim=-1)
        return float((w - w_hat).pow(2).sum()), float(w.pow(2).sum())

    per_expert, noise, signal = [], 0.0, 0.0
    for e in range(3):
        (n_gu, s_gu), (n_dn, s_dn) = parts(gate_up[e]), parts(down[e])
        per_expert.append(min(10 * math.log10(s_gu / n_gu), 10 * math.log10(s_dn / n_dn)))
        noise, signal = noise + n_gu + n_dn, signal + s_gu + s_dn
    assert record.expert_sqnr_db == pytest.approx(per_expert, abs=1e-4)
    assert record.sqnr_db == pytest.approx(10 * math.log10(signal / noise), abs=1e-4)
    assert min(record.expert_sqnr_db) == record.expert_sqnr_db[1]  # the expert with the outlier column


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return torch.randint(3, 2048, (4, 64), generator=torch.Generator().manual_seed(0))  # (samples, seq_len)


def _quantize_bundled(config, calibration=None):
    loaded = load_checkpoint(bundled_model_path())
    experts = loaded.model.config.n_routed_experts
    return quantize_(loaded.model, config, calibration=calibration, progress=False), experts


def _check_every_module_measured(report, experts: int) -> None:
    assert report.quantized and report.kept  # lm_head is kept
    for m in report.quantized:
        assert m.sqnr_db is not None and math.isfinite(m.sqnr_db) and m.sqnr_db > 0, m.name
        if m.kind == "experts":
            assert len(m.expert_sqnr_db) == experts and all(math.isfinite(v) for v in m.expert_sqnr_db), m.name
        else:
            assert m.expert_sqnr_db is None
    assert all(m.sqnr_db is None for m in report.kept)
    modules = json.loads(json.dumps(report.to_dict()["modules"], allow_nan=False))  # strict JSON
    assert {m["name"]: m["sqnr_db"] for m in modules if m["quantized"]} == {m.name: m.sqnr_db for m in report.quantized}


def test_rtn_int8_per_channel_far_above_int4_on_the_bundled_model() -> None:
    int8, experts = _quantize_bundled(RTNConfig(WeightScheme(8, PerChannel())))
    int4, _ = _quantize_bundled(RTNConfig(WeightScheme(4, PerGroup(128))))
    for report in (int8, int4):
        _check_every_module_measured(report, experts)
    worst8 = min(m.sqnr_db for m in int8.quantized)
    best4 = max(m.sqnr_db for m in int4.quantized)
    assert worst8 > best4 + 15  # ~6 dB per bit: 4 more bits is ~24 dB
    assert 35 < worst8 and best4 < 25


@pytest.mark.parametrize("config", [
    GPTQConfig(WeightScheme(4, PerGroup(128)), batch_size=4),
    AWQConfig(WeightScheme(4, PerGroup(128)), grid=2, batch_size=4),
    W8A8Config(DynamicPerToken(), smoothquant_alpha=None),
    W8A8Config(StaticPerTensor(), smoothquant_alpha=0.5, batch_size=4),
], ids=["gptq", "awq", "w8a8-dynamic", "w8a8-static-smoothquant"])
def test_calibrated_and_w8a8_runs_record_finite_sqnr(config, calibration) -> None:
    report, experts = _quantize_bundled(config, calibration)
    _check_every_module_measured(report, experts)
    if isinstance(config, W8A8Config):
        assert min(m.sqnr_db for m in report.quantized) > 35  # int8 per channel
    else:
        assert max(m.sqnr_db for m in report.quantized) < 25  # int4
