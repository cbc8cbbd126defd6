"""Gates, reports and the end-to-end evaluator."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from dsq.tools.testing import byte_bpe_tokenizer, tiny_llama
from dsq.core.errors import RecipeError
from dsq.eval import (
    BenchmarkSuite,
    Evaluator,
    FidelityResult,
    Gates,
    MCResult,
    ModelMetrics,
    PerplexityConfig,
    PerplexityResult,
    Report,
    check_gates,
    format_terminal_table,
    report_to_dict,
    write_report,
)

MIB = 1024 * 1024


def _metrics(
    name: str,
    *,
    ppl: float | None = 10.0,
    acc: float | None = 0.5,
    top1: float | None = None,
    kl: float | None = None,
    disk: int | None = 100 * MIB,
) -> ModelMetrics:
    return ModelMetrics(
        name=name,
        ppl=PerplexityResult(ppl=ppl, nll=math.log(ppl), tokens=1000, context=256, stride=128) if ppl else None,
        mc=MCResult(acc=acc, acc_norm=acc, n=100) if acc is not None else None,
        fidelity=FidelityResult(top1_agreement=top1, mean_kl=kl, max_kl=kl, tokens=512) if top1 is not None else None,
        weight_bytes_memory=200 * MIB,
        weight_bytes_disk=disk,
        artifact_bytes_disk=disk + 1000 if disk is not None else None,
        peak_rss_bytes=500 * MIB,
        eval_seconds=1.5,
    )


ORIGINAL = _metrics("original")
GOOD = _metrics("int8", ppl=10.2, acc=0.49, top1=0.97, kl=0.01, disk=50 * MIB)
BAD = _metrics("int2", ppl=14.0, acc=0.30, top1=0.60, kl=0.8, disk=20 * MIB)
GATES = Gates(
    max_ppl_increase_pct=5.0,
    max_ppl=12.0,
    min_mc_acc=0.4,
    max_mc_acc_drop_pts=2.0,
    min_top1_agreement=0.9,
    max_mean_kl=0.05,
    max_size_ratio=0.6,
)


def test_gates_pass_and_fail() -> None:
    results = check_gates(GATES, ORIGINAL, [GOOD, BAD])
    assert len(results) == 14
    assert all(r.passed for r in results if r.candidate == "int8")
    bad = {r.gate: r for r in results if r.candidate == "int2"}
    assert not any(r.passed for gate, r in bad.items() if gate != "max_size_ratio")
    assert bad["max_size_ratio"].passed
    assert bad["max_ppl_increase_pct"].value == pytest.approx(40.0)
    assert bad["max_mc_acc_drop_pts"].value == pytest.approx(20.0)


def test_gate_with_unmeasured_metric_fails_and_says_so() -> None:
    candidate = _metrics("int4", acc=None, top1=None, disk=None)
    results = {r.gate: r for r in check_gates(GATES, ORIGINAL, [candidate])}
    for gate in ("min_mc_acc", "max_mc_acc_drop_pts", "min_top1_agreement", "max_mean_kl", "max_size_ratio"):
        assert not results[gate].passed
        assert math.isnan(results[gate].value)
        assert "not measured" in results[gate].message
    assert results["max_ppl"].passed


def test_nan_metric_fails() -> None:
    broken = _metrics("nan", ppl=float("nan"))
    (result,) = check_gates(Gates(max_ppl=100.0), ORIGINAL, [broken])
    assert not result.passed


def test_unset_gates_are_skipped_and_bad_thresholds_rejected() -> None:
    assert check_gates(Gates(), ORIGINAL, [GOOD]) == []
    with pytest.raises(RecipeError, match="min_mc_acc"):
        Gates(min_mc_acc=55.0)


def test_report_has_deltas_settings_and_gates(tmp_path: Path) -> None:
    report = Report(
        original=ORIGINAL,
        candidates=[GOOD, BAD],
        gates=check_gates(GATES, ORIGINAL, [GOOD, BAD]),
        meta={"model": "tiny", "recipe": Path("recipes/int8.yaml")},
    )
    data = report_to_dict(report)
    deltas = data["candidates"][0]["deltas"]
    assert deltas["ppl_increase_pct"] == pytest.approx(2.0)
    assert deltas["mc_acc_delta_pts"] == pytest.approx(-1.0)
    assert deltas["disk_size_ratio"] == pytest.approx(0.5)
    assert data["perplexity_settings"] == {"context": 256, "stride": 128, "tokens": 1000}
    assert data["original"]["ppl"]["ppl"] == 10.0 and data["original"]["fidelity"] is None
    assert data["candidates"][1]["fidelity"]["mean_kl"] == 0.8
    assert data["passed"] is False and "torch" in data["machine"]

    written = write_report(report, tmp_path / "out", plots=False)
    loaded = json.loads(written.json.read_text())
    assert loaded["candidates"][0]["deltas"]["ppl_increase_pct"] == pytest.approx(2.0)
    markdown = written.markdown.read_text()
    assert "| int2 |" in markdown and "FAIL" in markdown and "How each metric is measured" in markdown

    table = format_terminal_table(report)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["model", "ppl", "Δppl%"]
    assert "+2.00" in lines[3] and "+40.00" in lines[4]
    assert any(line.startswith("FAIL  int2: max_ppl ") for line in lines)
    assert lines[-1] == "gates: FAIL"


def test_report_json_is_strict_with_unmeasured_gates(tmp_path: Path) -> None:
    candidate = _metrics("int4", acc=None)
    report = Report(ORIGINAL, [candidate], check_gates(Gates(min_mc_acc=0.3), ORIGINAL, [candidate]), {})
    written = write_report(report, tmp_path, plots=False)
    assert json.loads(written.json.read_text())["gates"][0]["value"] is None


def _tokenizer() -> PreTrainedTokenizerFast:
    return byte_bpe_tokenizer(["the cat sat on the mat. the dog ate the bone. " * 20], 300)


def test_evaluator_end_to_end(tmp_path: Path) -> None:
    tokenizer = _tokenizer()
    text = tmp_path / "held_out.txt"
    text.write_text("the cat sat on the mat while the dog ate the bone. " * 6)
    mc = tmp_path / "mc.jsonl"
    mc.write_text(
        "".join(
            json.dumps({"context": "the cat sat on the", "choices": [" mat", " bone", " dog"], "gold": 0}) + "\n"
            for _ in range(3)
        )
    )
    suite = BenchmarkSuite(
        text_path=text,
        mc_path=mc,
        perplexity=PerplexityConfig(context=32, stride=16),
        mc_limit=2,
        fidelity_seq_len=16,
        fidelity_max_tokens=64,
    )
    torch.manual_seed(0)
    original = tiny_llama(len(tokenizer))
    candidate = copy.deepcopy(original)
    with torch.no_grad():
        for parameter in candidate.model.layers.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    original.save_pretrained(tmp_path / "original")
    candidate.save_pretrained(tmp_path / "candidate")

    evaluator = Evaluator(suite, tokenizer, progress=False)
    early = evaluator.evaluate("too-early", candidate)
    assert early.fidelity is None
    base = evaluator.evaluate("original", original, reference=True, disk_path=tmp_path / "original")
    row = evaluator.evaluate("perturbed", candidate, disk_path=tmp_path / "candidate")

    assert base.fidelity is None and base.mc.n == 2 and base.ppl.context == 32
    assert row.fidelity is not None and row.fidelity.tokens == 64 and row.fidelity.mean_kl > 0
    assert row.ppl.tokens == base.ppl.tokens == evaluator.token_ids.numel() - 1
    assert row.weight_bytes_disk > 0 and row.artifact_bytes_disk > row.weight_bytes_disk
    assert row.weight_bytes_memory == base.weight_bytes_memory > 0
    assert row.peak_rss_bytes > 0 and row.to_dict()["extra"] == {}  # no stage facts: the evaluator ran none
    assert row.to_dict()["fidelity"]["tokens"] == 64

    results = check_gates(Gates(min_top1_agreement=0.0, max_size_ratio=1.01), base, [row])
    assert all(r.passed for r in results)
    report = Report(base, [row], results, {"model": "tiny-llama"})
    assert "perturbed" in format_terminal_table(report)
