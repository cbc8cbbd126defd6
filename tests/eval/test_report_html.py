"""report.html, the Worst layers section, peak CUDA memory; a run and ``dsq validate`` write them all."""
from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from dsq.core.loading import load_checkpoint
from dsq.cli import main
from dsq.eval import (
    SQNR_KEY, BenchmarkSuite, Evaluator, FidelityResult, Gates, MCResult, ModelMetrics, PeakCUDA, PerplexityConfig,
    PerplexityResult, QuantizationFacts, Report, check_gates, format_terminal_table, write_report,
)
from dsq.quantize import PerGroup, RTNConfig, WeightScheme, quantize_
from dsq.tools.testing import byte_bpe_tokenizer, tiny_llama

MIB = 1024 * 1024
ODD_NAME = 'rtn <int4> & "co"'


class _Page(HTMLParser):
    """Collects what the tests check: images, table rows with their class, scripts, external references, text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.row_classes: list[str] = []
        self.scripts = 0
        self.external: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag == "tr":
            self.row_classes.append(a.get("class") or "")
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith("data:"):
                self.external.append(a[key])

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _row(name: str, *, quantization: QuantizationFacts | None = None, original: bool = False,
         cuda: int | None = None) -> ModelMetrics:
    return ModelMetrics(
        name=name,
        ppl=PerplexityResult(ppl=24.1 if original else 24.3, nll=3.18, tokens=1000, context=256, stride=128),
        mc=MCResult(acc=0.476, acc_norm=0.5, n=250, num_fewshot=2),
        fidelity=None if original else FidelityResult(top1_agreement=0.93, mean_kl=0.008, max_kl=0.4, tokens=4096),
        weight_bytes_memory=18 * MIB if original else 6 * MIB,
        weight_bytes_disk=18 * MIB if original else 6 * MIB,
        artifact_bytes_disk=19 * MIB if original else 7 * MIB,
        peak_rss_bytes=600 * MIB,
        eval_seconds=3.0,
        quantization=quantization,
        peak_cuda_allocated_bytes=cuda,
        peak_cuda_reserved_bytes=None if cuda is None else 2 * cuda,
    )


@pytest.fixture(scope="module")
def rtn_run(tiny_deepseek_v3):
    """A tiny DeepSeek-V3 quantized with RTN INT4: (module names of the model, the quantization record)."""
    loaded = load_checkpoint(tiny_deepseek_v3)
    names = {name for name, _ in loaded.model.named_modules()}
    qreport = quantize_(loaded.model, RTNConfig(WeightScheme(4, PerGroup(64))), progress=False)
    return names, qreport


def test_worst_layers_section_names_modules_that_exist(rtn_run, tmp_path: Path) -> None:
    names, qreport = rtn_run
    quant = QuantizationFacts(qreport, 0.5, None)
    sqnr = quant.to_dict()[SQNR_KEY]
    assert len(sqnr["worst_modules"]) == 10 and sqnr["modules"] == len(qreport.quantized)
    values = [e["sqnr_db"] for e in sqnr["worst_modules"]]
    assert values == sorted(values) and values[0] == min(m.sqnr_db for m in qreport.quantized)
    report = Report(_row("original", original=True), [_row("rtn-int4-g64", quantization=quant)], [], {})
    markdown = write_report(report, tmp_path, plots=False).markdown.read_text()
    section = markdown.split("## Worst layers", 1)[1].split("\n## ", 1)[0]
    worst_table = section.split("Minimum per decoder layer:", 1)[0]
    listed = [line.split(" | ")[1] for line in worst_table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(listed) == 10 and set(listed) <= names  # the ten lowest, each a module of the model
    layer_rows = section.split("Minimum per decoder layer:", 1)[1]
    assert "| 0 | 8 |" in layer_rows and "| 1 | 9 |" in layer_rows  # two decoder layers, every module counted
    experts = [m for m in qreport.quantized if m.kind == "experts"]
    assert f"{min(experts[0].expert_sqnr_db):.2f}" in layer_rows  # the worst single expert of layer 1
    assert f"quantization.{SQNR_KEY}" not in markdown  # not repeated in "how it was made"
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["candidates"][0]["extra"]["quantization"][SQNR_KEY]["worst_modules"][0]["name"] == listed[0]
    assert data["original"]["mc"]["num_fewshot"] == 2 and "2-shot" in data["methods"]["multiple_choice"]


def test_html_report_embeds_every_plot_and_colours_every_gate(rtn_run, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _, qreport = rtn_run
    original = _row("original", original=True)
    candidate = _row(ODD_NAME, quantization=QuantizationFacts(qreport, 0.5, None))
    gates = check_gates(Gates(max_ppl_increase_pct=5.0, min_top1_agreement=0.99, max_size_ratio=0.5), original, [candidate])
    report = Report(original, [candidate], gates, {"model": "tiny <model>"})
    written = write_report(report, tmp_path)
    plots = written.plots
    assert [p.stem for p in plots] == ["accuracy_vs_size", "layer_error", "expert_sqnr"]
    page = _parse(written.html)
    assert len(page.images) == len(plots)
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert [base64.b64decode(src.split(",", 1)[1]) for src in page.images] == [p.read_bytes() for p in plots]  # same order
    gate_rows = [c for c in page.row_classes if c.startswith("gate ")]
    assert gate_rows == [f"gate {'pass' if g.passed else 'fail'}" for g in gates] and len(gate_rows) == 3
    assert {"gate pass", "gate fail"} <= set(gate_rows)
    assert page.scripts == 0 and page.external == []
    text = "".join(page.text)
    assert ODD_NAME in text and "tiny <model>" in text and "Worst layers" in text
    raw = (tmp_path / "report.html").read_text()
    assert "<int4>" not in raw and "&lt;int4&gt; &amp; &quot;co&quot;" in raw  # escaped, not markup


def test_peak_cuda_is_none_on_cpu_and_the_report_omits_it(tmp_path: Path) -> None:
    tokenizer = byte_bpe_tokenizer(["the cat sat on the mat. " * 20], 300)

    text = tmp_path / "held.txt"
    text.write_text("the cat sat on the mat. " * 8)
    suite = BenchmarkSuite(text_path=text, mc_path=None, perplexity=PerplexityConfig(context=16, stride=8))
    row = Evaluator(suite, tokenizer, progress=False).evaluate("original", tiny_llama(len(tokenizer)), reference=True)
    assert row.peak_cuda_allocated_bytes is None and row.peak_cuda_reserved_bytes is None
    with PeakCUDA(torch.device("cpu")) as cpu, PeakCUDA(None) as none:
        pass
    assert (cpu.allocated_bytes, cpu.reserved_bytes, none.allocated_bytes) == (None, None, None)
    report = Report(row, [], [], {})
    md_path = write_report(report, tmp_path, plots=False).markdown
    assert "CUDA" not in md_path.read_text().split("## Details")[0]
    assert "CUDA" not in format_terminal_table(report)
    assert "peak CUDA" not in "".join(_parse(tmp_path / "report.html").text)
    on_gpu = Report(_row("original", original=True, cuda=3 * MIB), [_row("int4", cuda=MIB)], [], {})
    md_path = write_report(on_gpu, tmp_path / "gpu", plots=False).markdown
    header = next(line for line in md_path.read_text().splitlines() if line.startswith("| model | ppl"))
    assert header.endswith("| peak CUDA alloc MiB | peak CUDA reserved MiB |")
    assert "| 3.0 | 6.0 |" in md_path.read_text() and "peak CUDA alloc MiB" in format_terminal_table(on_gpu)


def test_run_and_validate_write_html_with_plots_and_worst_layers(tmp_path: Path, tiny_deepseek_v3, capsys) -> None:
    text = tmp_path / "held.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 40)
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"context": f"def f{i}(a):\n", "choices": ["    return a\n", " zzz"], "gold": 0}) + "\n"
                          for i in range(3)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {tiny_deepseek_v3}\noutput: {tmp_path / 'out'}\nprogress: false\n"
        "quantize: {weights: {bits: 4, group_size: 64}}\n"
        f"eval:\n  perplexity: {{data: {text}, context: 64, stride: 32}}\n"
        f"  multiple_choice: {{data: {mc}, num_fewshot: 1}}\n  fidelity: {{seq_len: 32, max_tokens: 128}}\n"
        "  gates: {max_ppl: 1.0e+9}\n"
    )
    assert main(["run", str(recipe), "-q"]) == 0, capsys.readouterr().err
    art = tmp_path / "out"
    assert "report.html" in json.loads((art / "manifest.json").read_text())["files"]
    page = _parse(art / "report.html")
    pngs = sorted((art / "plots").glob("*.png"))
    assert {"layer_error.png", "expert_sqnr.png"} <= {p.name for p in pngs}
    assert len(page.images) == len(pngs) and [c for c in page.row_classes if c.startswith("gate")] == ["gate pass"]
    markdown = (art / "report.md").read_text()
    assert "## Worst layers" in markdown
    data = json.loads((art / "report.json").read_text())
    assert data["original"]["mc"]["num_fewshot"] == 1 and data["candidates"][0]["mc"]["num_fewshot"] == 1
    assert all(math.isfinite(m["sqnr_db"]) for m in json.loads((art / "manifest.json").read_text())["quantization"]["modules"]
               if m["quantized"])

    out = tmp_path / "ci"
    assert main(["validate", str(art), "-o", str(out), "-q"]) == 0, capsys.readouterr().err
    page = _parse(out / "report.html")
    pngs = sorted((out / "plots").glob("*.png"))
    assert "layer_error.png" in {p.name for p in pngs}  # from the artifact's manifest
    assert len(page.images) == len(pngs) and [c for c in page.row_classes if c.startswith("gate")] == ["gate pass"]
    assert "## Worst layers" in (out / "report.md").read_text()
