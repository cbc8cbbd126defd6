"""write_report: every file once, from memory; report.json keeps its keys; typed stage facts; the not-evaluated form."""
from __future__ import annotations

import base64
import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from dsq.eval import (
    SQNR_KEY, ArtifactQuantization, ExactMerge, FidelityResult, Gates, LoraFacts, MCResult, ModelMetrics,
    NotEvaluatedReport, OnnxFacts, PerplexityResult, QuantizationFacts, ReloadCheck, ReloadNotRun, Report,
    RequantizedMerge, StreamingFacts, TrainingFacts, check_gates, report_to_dict, weight_sqnr_summary, write_report,
)
from dsq.quantize.api import ModuleRecord, QuantizationReport

MIB = 1024 * 1024
SCHEME = "int4 group 64 sym"

# The keys of a report.json row as ModelMetrics wrote them with asdict (dataclass field order), plus a candidate's deltas.
ROW_KEYS = [
    "name", "ppl", "mc", "fidelity", "weight_bytes_memory", "weight_bytes_disk", "artifact_bytes_disk", "peak_rss_bytes",
    "eval_seconds", "extra", "peak_rss_reset_supported", "speed", "peak_cuda_allocated_bytes", "peak_cuda_reserved_bytes",
]
REPORT_KEYS = ["meta", "machine", "perplexity_settings", "methods", "original", "candidates", "gates", "passed"]


def _qreport() -> QuantizationReport:
    """A quantization report with SQNRs, fused experts, a kept lm_head and calibration facts."""
    modules = [
        ModuleRecord(f"model.layers.{i}.self_attn.{p}", "linear", True, "quantized", 4096, 16384, 2304, SCHEME, 18.0 + i + k / 10)
        for i in range(2) for k, p in enumerate(("q_proj", "o_proj"))
    ]
    modules.append(ModuleRecord("model.layers.1.mlp.experts", "experts", True, "quantized", 65536, 262144, 36864, SCHEME,
                                18.4, [18.9, 17.2, float("inf"), 18.1]))
    modules.append(ModuleRecord("lm_head", "linear", False, "lm_head (kept; set lm_head: true to quantize)", 8192, 32768, 32768))
    report = QuantizationReport(method="rtn", scheme=SCHEME, modules=modules, other_params=1000, other_bytes=4000,
                                other_breakdown={"embeddings": 1000})
    report.calibration = {"tokens": 256, "expert_routed_tokens": {"model.layers.1.mlp.experts": [40, 0, 130, 86]},
                          "experts_without_routed_tokens": {"model.layers.1.mlp.experts": [1]}}
    report.notes.append("1 expert(s) saw no calibration token")
    return report


def _row(name: str, *, original: bool = False, **facts) -> ModelMetrics:
    return ModelMetrics(
        name=name,
        ppl=PerplexityResult(ppl=24.1 if original else 24.4, nll=3.18, tokens=1000, context=256, stride=128),
        mc=MCResult(acc=0.48, acc_norm=0.5, n=250),
        fidelity=None if original else FidelityResult(top1_agreement=0.93, mean_kl=0.008, max_kl=0.4, tokens=4096),
        weight_bytes_memory=18 * MIB if original else 6 * MIB,
        weight_bytes_disk=18 * MIB if original else 6 * MIB,
        artifact_bytes_disk=19 * MIB if original else 7 * MIB,
        peak_rss_bytes=600 * MIB,
        eval_seconds=3.0,
        **facts,
    )


def _report(**facts) -> Report:
    original = _row("original", original=True)
    candidate = _row("rtn-int4-g64", **facts)
    gates = check_gates(Gates(max_ppl_increase_pct=5.0, min_top1_agreement=0.99), original, [candidate])
    return Report(original, [candidate], gates, {"model": "tiny", "machine": {"cpu": "test"}})


def _json(value: object) -> object:
    return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------- the facts as the run steps wrote them


def _old_summary(qreport: QuantizationReport, seconds: float, peak_rss: int | None) -> dict:
    """A row's extra["quantization"] as the pipeline's summary() built it from the quantization report."""
    d = qreport.to_dict()
    sqnr = weight_sqnr_summary(d.pop("modules"))
    if sqnr is not None:
        d[SQNR_KEY] = sqnr
    d["seconds"] = round(seconds, 3)
    d["peak_rss_bytes"] = peak_rss
    return d


def _old_export_summary(result) -> dict:
    """A row's extra["onnx"] as the export step built it from the export's result."""
    v = result.validation
    return {
        "path": str(result.path), "accuracy_level": result.accuracy_level, "cpu_target": result.cpu_target,
        "weight_op": result.weight_op, "embedding": result.plan.embedding, "max_abs_logit_diff": v.max_abs_diff, "tolerance": v.tolerance,
        "greedy_tokens_equal": v.greedy_equal, "greedy_tie_margins": [c.tie_margin for c in v.cases if c.tie_margin is not None],
        "matmul_nbits": result.ops.get("com.microsoft::MatMulNBits", 0), "int8_matmul": result.ops.get("MatMulInteger", 0),
        "experts_in_graph": sum(result.plan.experts.values()), "onnx_bytes": result.onnx_bytes, "seconds": round(result.seconds, 2),
    }


EXPORT = SimpleNamespace(
    path=Path("runs/x/onnx"), accuracy_level=4, cpu_target="portable", weight_op="matmul_nbits", onnx_bytes=7 * MIB,
    seconds=12.3456, plan=SimpleNamespace(embedding="int8 per row", experts={"model.layers.1.mlp.experts": 4}, int8_op="MatMulInteger"),
    validation=SimpleNamespace(max_abs_diff=3e-6, tolerance=1e-3, greedy_equal=False,
                               cases=[SimpleNamespace(tie_margin=None), SimpleNamespace(tie_margin=0.02)]),
    ops={"com.microsoft::MatMulNBits": 9, "MatMulInteger": 2},
)


def test_a_pipeline_candidate_keeps_the_report_json_of_before(tmp_path: Path) -> None:
    qreport = _qreport()
    reload = ReloadCheck(True, 4e-6, 1e-4)
    facts = QuantizationFacts(qreport, 1.23456, 5 * MIB)
    expected_extra = {"quantization": _old_summary(qreport, 1.23456, 5 * MIB), "reload_check": reload.to_dict()}
    written = write_report(_report(quantization=facts, reload_check=reload), tmp_path, plots=False)
    data = json.loads(written.json.read_text())
    assert list(data) == REPORT_KEYS
    assert list(data["original"]) == ROW_KEYS and data["original"]["extra"] == {}
    candidate = data["candidates"][0]
    assert list(candidate) == [*ROW_KEYS, "deltas"]
    assert candidate["extra"] == _json(expected_extra)
    assert set(candidate["extra"]["quantization"]) >= {"kept", "notes", "calibration", SQNR_KEY, "seconds", "peak_rss_bytes"}


def test_every_stage_fact_keeps_its_form() -> None:
    streamed = SimpleNamespace(seconds_reading=1.23456, seconds_writing=0.5, unused_tensors=["a", "b"], files=["m.safetensors"])
    qreport = _qreport()
    streaming = QuantizationFacts(qreport, 2.0, None, StreamingFacts.of(streamed)).to_dict()
    assert streaming == {**_old_summary(qreport, 2.0, None), "streaming": {
        "seconds_reading": 1.235, "seconds_writing": 0.5, "unused_checkpoint_tensors": 2, "weight_files": 1}}
    assert OnnxFacts.of(EXPORT).to_dict() == _old_export_summary(EXPORT)
    assert OnnxFacts.of(EXPORT, 0.25).to_dict() == {**_old_export_summary(EXPORT), "ppl_vs_torch_pct": 0.25}
    result = {"steps": 4, "tokens_seen": 2048, "world_size": 1, "final_validation_loss": 2.5}
    data = {"train_blocks": 16}
    assert TrainingFacts(result, 7 * MIB, data).to_dict() == {**result, "peak_rss_bytes": 7 * MIB, "data": data}
    assert LoraFacts("fp", 300, 1200, 16, 32.0).to_dict() == {
        "base": "fp", "trainable_params": 300, "total_params": 1200, "trainable_share": 0.25, "r": 16, "alpha": 32.0}
    assert ExactMerge().to_dict() == {"exact": True}
    drift = {"max_abs_logit_diff": 0.01}
    modules = [{"name": "model.layers.0.self_attn.q_proj", "sqnr_db": 30.0}]
    assert RequantizedMerge(drift, modules).to_dict() == {"exact": False, "drift_vs_adapter": drift, "modules": modules}


def test_row_extra_has_a_key_per_fact_present() -> None:
    qreport = _qreport()
    assert _row("x", reload_check=ReloadNotRun()).to_dict()["extra"] == {"reload_check": None}
    merged = _row("lora-merged-fp", merge=ExactMerge(), reload_check=ReloadCheck(False, None, 1e-4, "no reader")).facts_dict()
    assert list(merged) == ["merge", "reload_check"] and merged["reload_check"]["reason"] == "no reader"
    adapter = _row("lora-fp", training=TrainingFacts({"steps": 2}, None, {}), lora=LoraFacts("fp", 1, 4, 8, 16.0))
    assert list(adapter.facts_dict()) == ["training", "lora"]
    # an artifact's record (dsq validate): method, scheme and the SQNR summary; nothing without a measured SQNR
    record = qreport.to_dict()
    assert _row("a", quantization=ArtifactQuantization(record)).facts_dict() == {
        "quantization": {"method": "rtn", "scheme": SCHEME, SQNR_KEY: weight_sqnr_summary(record["modules"])}}
    unmeasured = {**record, "modules": [{**m, "sqnr_db": None} for m in record["modules"]]}
    assert _row("a", quantization=ArtifactQuantization(unmeasured)).facts_dict() == {}
    assert _row("onnx", onnx=OnnxFacts.of(EXPORT)).to_dict()["extra"]["onnx"]["greedy_tie_margins"] == [0.02]


# ----------------------------------------------------------------------------- learned rounding per block

BLOCK_LOSSES = {  # as autoround records them: block-output MSE with round-to-nearest, then with the rounding kept
    "model.layers.0": {"loss_before": 0.04, "loss_after": 0.03, "steps": 20, "kept_rtn": False},
    "model.layers.1": {"loss_before": 0.002, "loss_after": 0.002, "steps": 20, "kept_rtn": True},
    "lm_head": {"loss_before": 0.5, "loss_after": 0.45, "steps": 20, "kept_rtn": False},
}
BLOCK_ROWS = [
    ["model.layers.0", "0.04", "0.03", "-25.0", "20", "no"],
    ["model.layers.1", "0.002", "0.002", "+0.0", "20", "yes"],
    ["lm_head", "0.5", "0.45", "-10.0", "20", "no"],
]


def _autoround_report() -> Report:
    qreport = _qreport()
    qreport.method = "autoround"
    qreport.calibration = {"tokens": 256, "modules": BLOCK_LOSSES, "steps": 20, "lr": 0.05, "learn_clipping": True}
    return _report(quantization=QuantizationFacts(qreport, 1.0, None))


def test_learned_rounding_has_its_own_table(tmp_path: Path) -> None:
    written = write_report(_autoround_report(), tmp_path, plots=False)
    markdown = written.markdown.read_text()
    assert "\n## Learned rounding per block\n" in markdown
    section = markdown.split("\n## Learned rounding per block\n", 1)[1].split("\n## ", 1)[0]
    assert "round-to-nearest kept in 1 of 3 blocks" in section
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table == ["| block | loss before (RTN) | loss after | change % | steps | RTN kept |",
                     *("| " + " | ".join(cells) + " |" for cells in BLOCK_ROWS)]
    made = markdown.split(": how it was made\n", 1)[1].split("\n## ", 1)[0]
    assert "calibration.modules" not in made and "loss_before" not in made  # not repeated as a flat list
    assert "- **quantization.calibration.steps**: 20" in made and "- **quantization.calibration.lr**: 0.05" in made
    html = written.html.read_text(encoding="utf-8")
    assert "<h2>Learned rounding per block</h2>" in html
    for cells in BLOCK_ROWS:
        tds = "".join(f"<td>{c}</td>" for c in cells[:-1]) + f'<td class="text">{cells[-1]}</td>'
        assert f"<tr>{tds}</tr>" in html
    assert "loss_before" not in html
    data = json.loads(written.json.read_text())
    assert data["candidates"][0]["extra"]["quantization"]["calibration"]["modules"] == BLOCK_LOSSES  # report.json keeps them


def test_without_learned_rounding_there_is_no_such_section(tmp_path: Path) -> None:
    written = write_report(_report(quantization=QuantizationFacts(_qreport(), 1.0, None)), tmp_path, plots=False)
    assert "Learned rounding" not in written.markdown.read_text()
    assert "Learned rounding" not in written.html.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- each file once, from memory


class _Writes:
    """Counts Path.write_text / write_bytes per path and records every Path read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.writes: Counter[Path] = Counter()
        self.reads: list[Path] = []
        for name, log in (("write_text", self.writes), ("write_bytes", self.writes)):
            monkeypatch.setattr(Path, name, self._counting(getattr(Path, name), log))
        for name in ("read_text", "read_bytes"):
            monkeypatch.setattr(Path, name, self._recording(getattr(Path, name)))

    def _counting(self, original, log: Counter):
        def write(path: Path, *args, **kwargs):
            log[path] += 1
            return original(path, *args, **kwargs)
        return write

    def _recording(self, original):
        def read(path: Path, *args, **kwargs):
            self.reads.append(path)
            return original(path, *args, **kwargs)
        return read


def test_every_file_is_written_once_and_nothing_is_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    calls = Counter()
    to_dict = QuantizationReport.to_dict

    def counted(self):
        calls["to_dict"] += 1
        return to_dict(self)

    monkeypatch.setattr(QuantizationReport, "to_dict", counted)
    writes = _Writes(monkeypatch)
    report = _report(quantization=QuantizationFacts(_qreport(), 1.0, None), reload_check=ReloadCheck(True, 0.0, 1e-4))
    written = write_report(report, tmp_path)
    assert calls["to_dict"] == 1
    names = ["report.json", "report.md", "report.html", "plots/accuracy_vs_size.png", "plots/layer_error.png",
             "plots/expert_sqnr.png", "plots/expert_tokens.png"]
    assert dict(writes.writes) == {tmp_path / name: 1 for name in names}
    assert [p.relative_to(tmp_path).as_posix() for p in written.plots] == names[3:]
    assert not [p for p in writes.reads if p.is_relative_to(tmp_path)]  # plots and HTML from memory, no report.json read
    assert set(written.skipped_plots) == {"calibration_loss"}
    html = written.html.read_text(encoding="utf-8")
    embedded = [base64.b64decode(chunk.split('"', 1)[0]) for chunk in html.split('src="data:image/png;base64,')[1:]]
    assert embedded == [p.read_bytes() for p in written.plots]


def test_plots_need_no_report_json(tmp_path: Path) -> None:
    """The plots of a report drawn into a directory that holds nothing else."""
    pytest.importorskip("matplotlib")
    from dsq.eval.plots import draw_plots

    drawn = draw_plots(_report(quantization=QuantizationFacts(_qreport(), 1.0, None)))
    assert [p.name for p in drawn.plots] == ["accuracy_vs_size", "layer_error", "expert_sqnr", "expert_tokens"]
    assert all(p.png.startswith(b"\x89PNG\r\n\x1a\n") for p in drawn.plots) and list(tmp_path.iterdir()) == []


def test_without_plots_the_page_has_none(tmp_path: Path) -> None:
    written = write_report(_report(), tmp_path, plots=False)
    assert written.plots == () and not (tmp_path / "plots").exists()
    assert "data:image/png" not in written.html.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json", "report.md"]


# ----------------------------------------------------------------------------- not evaluated


def test_not_evaluated_report_is_the_one_of_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qreport = _qreport()
    facts = QuantizationFacts(qreport, 61.04, 3 * MIB, StreamingFacts(10.0, 2.0, 0, 3))
    why = "the model needs 1.2 TB, 0.5 TB available"
    meta = {"model": "/models/big", "model_type": "deepseek_v3", "streaming": {"streamed": True, "reason": why}}
    report = NotEvaluatedReport.of("rtn-int4-g64", why, Gates(max_ppl_increase_pct=2.0, max_size_ratio=0.3), facts, meta)
    writes = _Writes(monkeypatch)
    written = write_report(report, tmp_path)
    assert dict(writes.writes) == {tmp_path / "report.json": 1, tmp_path / "report.md": 1}
    assert written.html is None and written.plots == () and not report.passed
    reason = f"not evaluated: {why}; run `dsq validate` on a machine where the model fits"
    quant = {**_old_summary(qreport, 61.04, 3 * MIB), "streaming": facts.streaming.to_dict()}
    gates = [{"gate": g, "passed": False, "message": f"{g}: {reason}"} for g in ("max_ppl_increase_pct", "max_size_ratio")]
    expected = {"candidate": "rtn-int4-g64", "evaluation": reason, "quantization": quant, "gates": gates, "meta": meta}
    assert written.json.read_text() == json.dumps(expected, indent=2, default=str) + "\n"
    assert all(math.isnan(g.value) and g.candidate == "rtn-int4-g64" for g in report.gates)
    lines = ["# dsq report: rtn-int4-g64", "", f"Evaluation {reason}.", "",
             f"Quantized {qreport.quantized_params:,} parameters in 61.0 s; peak RSS {3 * MIB:,} bytes.",
             "- NOTE: 1 expert(s) saw no calibration token",
             *(f"- GATE NOT EVALUATED: {g['message']}" for g in gates)]
    assert written.markdown.read_text() == "\n".join(lines) + "\n"
    assert report_to_dict(report) == json.loads(written.json.read_text())
