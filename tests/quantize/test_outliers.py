"""Outlier channels (dsq.tools.outliers): function-preserving, measurable, and what AWQ is for."""
import copy
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsq.core.loading import load_checkpoint
from dsq.tools.outliers import OutlierSpec, add_outlier_channels, input_outlier_ratios, outlier_gains
from dsq.quantize import AWQConfig, PerGroup, RTNConfig, WeightScheme, quantize_


def ids_for(model, samples: int = 8, seq: int = 32) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (samples, seq), generator=torch.Generator().manual_seed(123))


def test_outlier_gains_are_deterministic_and_in_range():
    spec = OutlierSpec(fraction=0.05, low=20, high=100, seed=3)
    gains = outlier_gains(256, spec)
    big = gains[gains != 1]
    assert len(big) == round(0.05 * 256)
    assert ((big >= 20 - 1e-3) & (big <= 100 + 1e-3)).all()
    assert torch.equal(gains, outlier_gains(256, spec))
    assert not torch.equal(gains, outlier_gains(256, OutlierSpec(fraction=0.05, seed=4)))
    assert (outlier_gains(16, spec) != 1).sum() == 1  # at least one channel


@pytest.mark.parametrize("bad", [dict(fraction=0.0), dict(fraction=1.0), dict(low=0.5), dict(low=50, high=20)])
def test_outlier_spec_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        OutlierSpec(**bad)


@pytest.mark.parametrize("arch", ["deepseek_v3", "llama", "qwen2"])
def test_add_outlier_channels_keeps_the_function_and_makes_outliers(tiny_checkpoint, arch):
    model = load_checkpoint(tiny_checkpoint(arch)).model
    ids = ids_for(model)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    before = input_outlier_ratios(model, ids)
    norms = add_outlier_channels(model)
    after = input_outlier_ratios(model, ids)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    assert norms and all(n.endswith("norm") for n in norms)
    behind_norm = [n for n in after if n.endswith(("q_a_proj", "q_proj", "kv_b_proj", "gate_proj", "up_proj"))]
    assert behind_norm
    assert statistics.median(before[n] for n in behind_norm) < 5
    assert min(after[n] for n in behind_norm) > 10
    assert after["lm_head"] == pytest.approx(before["lm_head"], rel=1e-4)  # the final norm is not touched


@pytest.mark.parametrize("arch", ["deepseek_v3", "llama"])
def test_awq_recovers_what_outlier_channels_cost_rtn(tiny_checkpoint, arch):
    """RTN loses more on the outlier copy; AWQ gives back at least half of that extra loss."""
    plain = load_checkpoint(tiny_checkpoint(arch)).model
    outlier = copy.deepcopy(plain)
    add_outlier_channels(outlier)
    ids = ids_for(plain)
    scheme = WeightScheme(4, PerGroup(32))

    def quantized(model, config):
        """(relative logit error, report) of a quantized copy of ``model``."""
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        q = copy.deepcopy(model)
        report = quantize_(q, config, calibration=None if isinstance(config, RTNConfig) else ids, progress=False)
        with torch.no_grad():
            return float((q(input_ids=ids).logits - ref).norm() / ref.norm()), report

    rtn_plain, _ = quantized(plain, RTNConfig(scheme))
    rtn_outlier, _ = quantized(outlier, RTNConfig(scheme))
    awq_outlier, report = quantized(outlier, AWQConfig(scheme, batch_size=4))
    assert rtn_outlier > 1.2 * rtn_plain, (rtn_plain, rtn_outlier)
    assert awq_outlier - rtn_plain < 0.5 * (rtn_outlier - rtn_plain), (rtn_plain, rtn_outlier, awq_outlier)
    # the report says what AWQ saw: outlier channels at every input norm
    ratios = [r["input_max_over_median"] for n, r in report.calibration["modules"].items() if n.endswith("input_layernorm")]
    assert len(ratios) == plain.config.num_hidden_layers and min(ratios) > 10


def test_make_outlier_model_refuses_a_directory_it_did_not_write(tmp_path):
    """The benchmark script fails before any work, naming the directory, and leaves it as it was."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "make_outlier_model.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(out), "--overwrite"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert str(out) in proc.stderr and "outliers.json" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["mine"] and (out / "notes.txt").read_text() == "keep"
