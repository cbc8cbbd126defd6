"""Plots: each figure is a real, non-blank PNG drawn from the report in memory; absent data is skipped with a reason."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

from dsq.eval.fidelity import FidelityResult  # noqa: E402
from dsq.eval.harness import ModelMetrics  # noqa: E402
from dsq.eval.multiple_choice import MCResult  # noqa: E402
from dsq.eval.perplexity import PerplexityResult  # noqa: E402
from dsq.eval.facts import ArtifactQuantization, OnnxFacts, QuantizationFacts  # noqa: E402
from dsq.eval.plots import (  # noqa: E402
    PLOT_NAMES, MissingPlotData, accuracy_vs_size, calibration_loss, draw_plots, expert_sqnr, expert_tokens, layer_error,
    png_bytes,
)
from dsq.eval.report import Report  # noqa: E402
from dsq.eval.report_files import write_report  # noqa: E402
from dsq.quantize.api import ModuleRecord, QuantizationReport  # noqa: E402

MIB = 1024 * 1024
SCHEME = "int4 group 128 sym"
EXPERTS = 8


# ----------------------------------------------------------------------------- synthetic data, real shapes


def _row(name: str, ppl: float | None, acc: float | None, disk: int | None, *, original: bool = False,
         **facts) -> ModelMetrics:
    return ModelMetrics(
        name=name,
        ppl=None if ppl is None else PerplexityResult(ppl=ppl, nll=3.18, tokens=25126, context=256, stride=128),
        mc=None if acc is None else MCResult(acc=acc, acc_norm=acc + 0.02, n=250),
        fidelity=None if original else FidelityResult(top1_agreement=0.95, mean_kl=0.004, max_kl=0.3, tokens=4096),
        weight_bytes_memory=disk or 6 * MIB,
        weight_bytes_disk=disk,
        artifact_bytes_disk=None if disk is None else disk + 100_000,
        peak_rss_bytes=900 * MIB,
        eval_seconds=12.5,
        **facts,
    )


def _report(output: str, candidates: list[ModelMetrics], original: ModelMetrics | None = None) -> Report:
    original = original or _row("original", 24.1045, 0.476, int(18.4 * MIB), original=True)
    meta = {"model": "/models/tiny_deepseek_v3", "recipe": {"output": output}, "machine": {"cpu": "test"}}
    return Report(original=original, candidates=candidates, gates=[], meta=meta)


ONNX = OnnxFacts(
    path="runs/gptq/onnx", accuracy_level=0, weight_op="matmul_nbits", embedding=None, max_abs_logit_diff=2e-6,
    tolerance=1e-3, greedy_tokens_equal=True, greedy_tie_margins=(), matmul_nbits=60, int8_matmul=0,
    experts_in_graph=24, onnx_bytes=int(8 * MIB), seconds=3.5,
)


def _layer_names(layers: int, experts: int = EXPERTS) -> list[str]:
    """GPTQ per-module names of a DeepSeek-V3-like model (layer 0 dense, the others MoE)."""
    names = []
    for i in range(layers):
        names += [f"model.layers.{i}.self_attn.{p}" for p in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")]
        if i == 0:
            names += [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
            continue
        names += [f"model.layers.{i}.mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        for e in range(experts):
            names += [f"model.layers.{i}.mlp.experts.{e}.gate_up_proj", f"model.layers.{i}.mlp.experts.{e}.down_proj"]
    return names


def _records(layers: int, sqnr: bool = True) -> list[ModuleRecord]:
    """Module records; ``sqnr=False``: as written before records carried a weight SQNR."""
    def db(k: int) -> float | None:
        return 18.0 + 1.5 * ((k * 7919) % 11) / 10 if sqnr else None

    records = []
    for i in range(layers):
        for k, p in enumerate(("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")):
            records.append(ModuleRecord(f"model.layers.{i}.self_attn.{p}", "linear", True, "quantized", 32768, 131072, 17408, SCHEME,
                                        db(7 * i + k)))
        if i > 0:
            experts = [db(13 * i + e) - 0.4 for e in range(EXPERTS)] if sqnr else None
            records.append(ModuleRecord(f"model.layers.{i}.mlp.experts", "experts", True, "quantized", 786432, 3145728, 417792, SCHEME,
                                        db(3 * i), experts))
    records.append(ModuleRecord("lm_head", "linear", False, "lm_head (kept; set lm_head: true to quantize)", 524288, 2097152, 2097152))
    return records


def _gptq_report(layers: int = 4, experts: int = EXPERTS, starved: dict[str, list[int]] | None = None) -> QuantizationReport:
    """What a GPTQ run reports, with calibration losses and routed-token counts."""
    counts = {}
    for i in range(1, layers):
        name = f"model.layers.{i}.mlp.experts"
        counts[name] = [1000 + 37 * e + 11 * i for e in range(experts)]
        for e in (starved or {}).get(name, []):
            counts[name][e] = 0
    losses = {name: {"gptq_loss": 0.01 * (1 + (k * 7919) % 97)} for k, name in enumerate(_layer_names(layers, experts))}
    report = QuantizationReport(method="gptq", scheme=SCHEME, modules=_records(layers), other_params=533504,
                                other_bytes=2134016, other_breakdown={"embeddings": 524288, "norms": 3072, "router": 6144})
    report.calibration = {
        "samples": 32, "seq_len": 256, "tokens": 8192,
        "expert_routed_tokens": counts,
        "experts_without_routed_tokens": {n: [e for e, c in enumerate(cs) if c == 0] for n, cs in counts.items() if 0 in cs},
        "expert_statistics": "every calibration token through every expert (routed output kept)",
        "modules": losses,
        "damp": 0.01, "block_size": 128, "act_order": True, "unrouted_weight": 0.1,
    }
    return report


def _gptq_record(layers: int = 4, experts: int = EXPERTS, starved: dict[str, list[int]] | None = None) -> dict:
    """``manifest.json["quantization"]`` of a GPTQ run, made by the real ``QuantizationReport.to_dict``."""
    return _gptq_report(layers, experts, starved).to_dict()


def _awq_record() -> dict:
    report = QuantizationReport(method="awq", scheme=SCHEME, modules=_records(2))
    modules = {
        "model.layers.0.input_layernorm": {"awq_balances": ["self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"],
                                           "awq_ratio": 0.05, "awq_loss": 1.7e-06, "awq_loss_without_scaling": 1.8e-06},
        "model.layers.0.post_attention_layernorm": {"awq_balances": ["mlp.gate_proj", "mlp.up_proj"], "awq_ratio": None,
                                                    "awq_loss": 0.0101, "awq_loss_without_scaling": 0.0101},
        "model.layers.1.post_attention_layernorm": {
            "awq_balances": ["mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.experts"],
            "awq_ratio": 0.4, "awq_loss": 0.0013, "awq_loss_without_scaling": 0.00137},
        "model.layers.1.mlp.experts.down_proj": {"awq_ratio_per_expert": [0.1, 0.2, 0.15, 0.15, 0.25, 0.2, 0.15, 0.15]},
    }
    report.calibration = {"samples": 8, "seq_len": 128, "tokens": 1024, "expert_routed_tokens": {},
                          "experts_without_routed_tokens": {}, "modules": modules, "grid": 20}
    return report.to_dict()


def _autoround_report(layers: int = 4) -> QuantizationReport:
    """What an autoround run reports: a learned-rounding loss per decoder block, one block where nearest was kept."""
    report = QuantizationReport(method="autoround", scheme=SCHEME, modules=_records(layers))
    blocks = {f"model.layers.{i}": {"loss_before": 0.01 * (i + 1), "loss_after": 0.006 * (i + 1), "steps": 50,
                                     "kept_rtn": False} for i in range(layers)}
    blocks["model.layers.2"] = {"loss_before": 0.03, "loss_after": 0.03, "steps": 50, "kept_rtn": True}
    report.calibration = {"samples": 8, "seq_len": 128, "tokens": 1024, "expert_routed_tokens": {},
                          "experts_without_routed_tokens": {}, "modules": blocks, "steps": 50, "lr": 0.02}
    return report


def _rtn_record(sqnr: bool = True) -> dict:
    return QuantizationReport(method="rtn", scheme=SCHEME, modules=_records(4, sqnr)).to_dict()


def _png(figure, path: Path) -> Path:
    path.write_bytes(png_bytes(figure))
    return path


def _check_png(path: Path, min_width: int = 400, min_height: int = 250) -> None:
    """A PNG file of a sensible size whose pixels are not all one colour."""
    assert path.is_file()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    height, width = image.shape[:2]
    assert width >= min_width and height >= min_height, image.shape
    assert width <= 4000 and height <= 4000, image.shape
    assert image[..., :3].std() > 0.01


# ----------------------------------------------------------------------------- tests


def test_accuracy_vs_size_two_reports(tmp_path: Path) -> None:
    first = _report("runs/gptq", [_row("gptq-int4-g128", 24.117, 0.472, int(6 * MIB)),
                                  _row("gptq-int4-g128-onnx", 24.117, 0.472, int(7.9 * MIB), onnx=ONNX)])
    second = _report("runs/int8", [_row("rtn-int8-ch", 24.101, 0.472, int(7.7 * MIB))])
    _check_png(_png(accuracy_vs_size([first, second]), tmp_path / "acc.png"), min_width=1000)


def test_accuracy_vs_size_many_rows_numbered(tmp_path: Path) -> None:
    """More rows than direct labels: numbered points and a key; no accuracy measured: one panel."""
    original = _row("original", 24.1045, None, int(18.4 * MIB), original=True)
    rows = [_row(f"cand-{i}", 24.1 + 0.01 * i, None, int((4 + i) * MIB)) for i in range(4)]
    reports = [_report("runs/a", rows[:2], original), _report("runs/b", rows[2:] + [_row("cand-0", 24.3, None, 5 * MIB)], original)]
    _check_png(_png(accuracy_vs_size(reports, max_direct_labels=3), tmp_path / "acc.png"), min_width=900)


def test_accuracy_vs_size_without_metrics_is_missing_data() -> None:
    report = _report("runs/x", [_row("c", None, None, 6 * MIB)], original=_row("original", None, None, 18 * MIB, original=True))
    with pytest.raises(MissingPlotData, match="ppl.ppl or mc.acc"):
        accuracy_vs_size([report])


def test_layer_error_gptq_per_module_and_grouped(tmp_path: Path) -> None:
    record = _gptq_record(layers=2)
    _check_png(_png(calibration_loss(record), tmp_path / "per_module.png"), min_height=700)  # every GPTQ loss, experts too
    _check_png(_png(calibration_loss(record, max_bars=10), tmp_path / "grouped.png"))  # grouped by layer and component
    _check_png(_png(layer_error(record), tmp_path / "sqnr.png"))  # the weight SQNR comes first


def test_layer_error_reads_the_report_summary_and_awq(tmp_path: Path) -> None:
    summary = _gptq_record(layers=1)
    summary.pop("modules")  # report.json's extra["quantization"] has no modules list
    _check_png(_png(layer_error(summary), tmp_path / "summary.png"))
    _check_png(_png(layer_error(_awq_record()), tmp_path / "awq.png"))


def test_layer_error_without_an_error_metric_says_why() -> None:
    with pytest.raises(MissingPlotData, match="rtn .*no per-module error metric"):
        layer_error(_rtn_record(sqnr=False))


def test_expert_tokens_marks_starved_experts(tmp_path: Path) -> None:
    record = _gptq_record(layers=4, starved={"model.layers.2.mlp.experts": [3, 5]})
    assert record["calibration"]["experts_without_routed_tokens"] == {"model.layers.2.mlp.experts": [3, 5]}
    out = _png(expert_tokens(record), tmp_path / "tokens.png")
    _check_png(out)
    image = imread(out)[..., :3]
    red = (image[..., 0] > 0.9) & (image[..., 1] < 0.1) & (image[..., 2] < 0.1)
    assert red.sum() > 500  # the two 0-token cells are filled red


def test_expert_tokens_missing_data() -> None:
    with pytest.raises(MissingPlotData, match="no calibration"):
        expert_tokens(_rtn_record())
    with pytest.raises(MissingPlotData, match="no expert_routed_tokens"):
        expert_tokens(_awq_record())  # a dense calibration: no routed experts


def test_draw_plots_gptq_run(tmp_path: Path) -> None:
    """Every plot of a GPTQ run, from the objects in memory: nothing is read from disk."""
    facts = QuantizationFacts(_gptq_report(layers=2), seconds=12.0, peak_rss_bytes=None)
    report = _report("runs/gptq", [_row("gptq-int4-g128", 24.117, 0.472, 6 * MIB, quantization=facts)])
    drawn = draw_plots(report)
    assert [p.name for p in drawn.plots] == list(PLOT_NAMES) and drawn.skipped == {}
    for plot in drawn.plots:
        _check_png(_png_bytes(plot.png, tmp_path / plot.file_name))


def test_calibration_loss_draws_autoround_block_losses(tmp_path: Path) -> None:
    """The learned-rounding loss per block (bars) against round-to-nearest (ticks): drawn, not skipped."""
    facts = QuantizationFacts(_autoround_report(), seconds=30.0, peak_rss_bytes=None)
    drawn = draw_plots(_report("runs/autoround", [_row("autoround-int4-g128", 24.11, 0.472, 6 * MIB, quantization=facts)]))
    assert "calibration_loss" not in drawn.skipped
    assert [p.name for p in drawn.plots] == ["accuracy_vs_size", "layer_error", "calibration_loss", "expert_sqnr"]
    figure = calibration_loss(facts.record)
    ax = figure.axes[0]
    assert ax.get_xlabel() == "learned rounding block-output MSE (lower is better)"
    assert [round(p.get_width(), 6) for p in ax.patches] == [0.006, 0.012, 0.03, 0.024]  # loss_after, model order
    assert "round to nearest" in [t.get_text() for t in ax.get_legend().get_texts()]
    _check_png(_png(figure, tmp_path / "autoround.png"))


def _png_bytes(png: bytes, path: Path) -> Path:
    path.write_bytes(png)
    return path


def test_plots_skip_with_reasons_and_remove_stale_ones(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    unmeasured = _row("rtn-int4", None, None, 6 * MIB, quantization=ArtifactQuantization(_rtn_record(sqnr=False)))
    report = _report("runs/rtn", [unmeasured], original=_row("original", None, None, 18 * MIB, original=True))
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "layer_error.png").write_bytes(b"stale")
    with caplog.at_level(logging.WARNING, logger="dsq.eval.plots"):
        written = write_report(report, tmp_path)
    assert written.plots == ()
    skipped = written.skipped_plots
    assert set(skipped) == set(PLOT_NAMES)
    assert "no row has weight_bytes_disk together with ppl.ppl or mc.acc" in skipped["accuracy_vs_size"]
    assert "no per-module error metric" in skipped["layer_error"]
    assert "no calibration loss" in skipped["calibration_loss"]
    assert "no per-expert SQNR" in skipped["expert_sqnr"]
    assert "no calibration" in skipped["expert_tokens"]
    assert all(skipped[name].endswith("[from manifest.json quantization]") for name in PLOT_NAMES[1:])
    assert not (tmp_path / "plots" / "layer_error.png").exists()  # a stale plot does not survive a skip
    logged = [r.getMessage() for r in caplog.records if r.name == "dsq.eval.plots"]
    assert len(logged) == 5 and all("skipped" in m for m in logged)


def test_a_report_without_quantization_gets_the_accuracy_plot_only() -> None:
    drawn = draw_plots(_report("runs/fp", [_row("fp16", 24.2, 0.47, 9 * MIB)]))
    assert [p.name for p in drawn.plots] == ["accuracy_vs_size"]
    assert all("no quantization record" in reason and "[from" not in reason for reason in drawn.skipped.values())


def test_rtn_record_with_sqnr_gets_sqnr_plots(tmp_path: Path) -> None:
    """A calibration-free method's record has weight SQNRs: per-module and per-expert plots, no loss plot."""
    report = _report("runs/rtn", [_row("rtn-int4", None, None, None, quantization=ArtifactQuantization(_rtn_record()))],
                     original=_row("original", None, None, 18 * MIB, original=True))
    drawn = draw_plots(report)
    assert [p.name for p in drawn.plots] == ["layer_error", "expert_sqnr"]
    assert set(drawn.skipped) == {"accuracy_vs_size", "calibration_loss", "expert_tokens"}
    for plot in drawn.plots:
        _check_png(_png_bytes(plot.png, tmp_path / plot.file_name))
    with pytest.raises(MissingPlotData, match="rtn .*no calibration loss .*loss_after.*GPTQ, AWQ and autoround record one"):
        calibration_loss(_rtn_record())
    with pytest.raises(MissingPlotData, match="no per-expert SQNR"):
        expert_sqnr(_rtn_record(sqnr=False))
