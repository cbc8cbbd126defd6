"""Evaluation report: JSON for machines, Markdown and a self-contained HTML page for people, a
fixed-width terminal table."""
from __future__ import annotations

import base64
import html
import json
import math
import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dsq.eval.gates import (
    GateResult,
    disk_size_ratio,
    mc_acc_delta_pts,
    mc_acc_norm_delta_pts,
    memory_size_ratio,
    ppl_increase_pct,
)
from dsq.eval.harness import ModelMetrics
from dsq.eval.memory import machine_info

_MIB = 1024 * 1024


@dataclass(frozen=True)
class Report:
    """Everything one evaluation run measured.

    Attributes:
        original: The original model's row.
        candidates: Compressed models' rows.
        gates: Gate outcomes (empty when no gate was set).
        meta: Free-form run facts (model id, recipe, date). A ``"machine"`` entry, if
            present, replaces the :func:`machine_info` of the machine writing the report.
    """

    original: ModelMetrics
    candidates: list[ModelMetrics]
    gates: list[GateResult]
    meta: dict


def _methods(report: Report) -> dict[str, str]:
    """How each metric is measured, stated with this run's settings."""
    ppl = report.original.ppl
    ppl_setting = (
        f"windows of {ppl.context} tokens every {ppl.stride} tokens, {ppl.tokens} scored tokens"
        if ppl is not None
        else "not measured"
    )
    return {
        "perplexity": (
            f"exp of the mean next-token negative log-likelihood over the held-out text ({ppl_setting}); "
            "each window scores only the predictions the previous window did not, so every token but the "
            "first is scored exactly once, with at least context - stride tokens of left context"
        ),
        "multiple_choice": (
            f"{_shots(report)} log-likelihood scoring as in lm-evaluation-harness: each choice's summed token "
            "log-probability given the context; acc = argmax of the sum, acc_norm = argmax of the sum "
            "divided by the choice's length in UTF-8 bytes; with k-shot, k other items (context + gold choice, "
            "drawn per item with a fixed seed) precede the context, which is cut from the left to fit the "
            "model's window (the choice never is)"
        ),
        "fidelity": (
            "the original and the candidate run on the same non-overlapping windows of the held-out text; "
            "top1 = fraction of positions with the same argmax next token; KL = "
            "sum_v p_orig(v) * (log p_orig(v) - log p_cand(v)) per position in nats (float32), mean and max"
        ),
        "weights_memory": (
            "bytes of all parameters and buffers (packed quantized weights included), shared tensors once; "
            "for ONNX rows the bytes of the graph and its external weight data"
        ),
        "weights_disk": (
            "bytes of the weight files (.safetensors; .onnx and .onnx.data for ONNX rows) in the saved artifact; "
            "artifact = all its files"
        ),
        "speed": (
            "tokens/s with a KV cache on a random prompt: prefill = batch x prompt tokens / seconds of one prompt "
            "pass from an empty cache; decode = batch x new tokens / seconds of the greedy single-token steps after "
            "it; median of the timed runs, same settings for torch and ONNX Runtime rows"
        ),
        "size_ratio": "candidate weight bytes on disk / original weight bytes on disk",
        "peak_rss": (
            "peak resident set size of the whole process while the model was evaluated (kernel high-water "
            "mark reset before each model); includes every model still loaded"
        ),
        "peak_cuda": (
            "for a model on a CUDA device: torch.cuda.max_memory_allocated / max_memory_reserved of that device "
            "during its evaluation (peak statistics reset before each model); not measured on CPU"
        ),
        "weight_sqnr": (
            "per quantized module: 10 log10(|W|^2 / |W - dequant(Q(W))|^2) in dB, fp32, of the float weight it "
            "was quantized from (after AWQ / SmoothQuant folding) against the stored integers and scales; "
            "fused experts pool every expert's tensors, and each expert's own figure is the lower of its "
            "gate_up and down SQNRs; higher is better (about 6 dB per bit)"
        ),
    }


def _shots(report: Report) -> str:
    """``zero-shot`` or ``k-shot`` as the rows were measured."""
    ks = sorted({row.mc.num_fewshot for row in (report.original, *report.candidates) if row.mc is not None})
    return "zero-shot" if ks in ([], [0]) else "/".join(f"{k}-shot" for k in ks)


def _deltas(original: ModelMetrics, candidate: ModelMetrics) -> dict[str, float | None]:
    """Candidate-versus-original comparisons."""
    return {
        "ppl_increase_pct": ppl_increase_pct(original, candidate),
        "mc_acc_delta_pts": mc_acc_delta_pts(original, candidate),
        "mc_acc_norm_delta_pts": mc_acc_norm_delta_pts(original, candidate),
        "disk_size_ratio": disk_size_ratio(original, candidate),
        "memory_size_ratio": memory_size_ratio(original, candidate),
    }


def _finite_or_none(value: Any) -> Any:
    """Replace non-finite floats (NaN, inf) with ``None`` throughout, so the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def report_to_dict(report: Report) -> dict:
    """Plain-data form of a report.

    Args:
        report: The report.

    Returns:
        ``meta``, ``machine``, ``perplexity_settings`` (context, stride, tokens), ``methods``,
        ``original`` (all metrics), ``candidates`` (all metrics plus ``deltas``: ppl increase
        %, accuracy deltas in points, size ratios), ``gates`` and ``passed`` (all gates
        passed). Non-finite numbers become ``None``.
    """
    meta = dict(report.meta)
    machine = meta.pop("machine", None) or machine_info()
    ppl = report.original.ppl
    candidates = [
        {**candidate.to_dict(), "deltas": _deltas(report.original, candidate)} for candidate in report.candidates
    ]
    return _finite_or_none(
        {
            "meta": meta,
            "machine": machine,
            "perplexity_settings": (
                {"context": ppl.context, "stride": ppl.stride, "tokens": ppl.tokens} if ppl is not None else None
            ),
            "methods": _methods(report),
            "original": report.original.to_dict(),
            "candidates": candidates,
            "gates": [asdict(gate) for gate in report.gates],
            "passed": all(gate.passed for gate in report.gates),
        }
    )


def _num(value: float | None, spec: str) -> str:
    """Format a number, ``-`` when missing."""
    return "-" if value is None else format(value, spec)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / _MIB:.1f}"


def _row_cells(original: ModelMetrics, row: ModelMetrics) -> list[str]:
    """Terminal/Markdown cells of one row, in :data:`_COLUMNS` order."""
    is_original = row is original
    return [
        row.name,
        _num(row.ppl.ppl if row.ppl else None, ".3f"),
        "-" if is_original else _num(ppl_increase_pct(original, row), "+.2f"),
        _num(row.mc.acc if row.mc else None, ".4f"),
        _num(row.mc.acc_norm if row.mc else None, ".4f"),
        _num(row.fidelity.top1_agreement if row.fidelity else None, ".4f"),
        _num(row.fidelity.mean_kl if row.fidelity else None, ".4g"),
        _mib(row.weight_bytes_memory),
        _mib(row.weight_bytes_disk),
        _mib(row.peak_rss_bytes) + ("" if row.peak_rss_reset_supported else "*"),
    ]


_COLUMNS = ("model", "ppl", "Δppl%", "acc", "acc_norm", "top1", "KL", "weights MiB", "disk MiB", "peak RSS MiB")


_SPEED_COLUMNS = ("prefill tok/s", "decode tok/s")


def _has_speed(report: Report) -> bool:
    return any(row.speed is not None for row in (report.original, *report.candidates))


def _columns(report: Report) -> tuple[str, ...]:
    return _COLUMNS + (_SPEED_COLUMNS if _has_speed(report) else ()) + (_CUDA_COLUMNS if _has_cuda(report) else ())


def _speed_cells(row: ModelMetrics) -> list[str]:
    s = row.speed
    return [_num(s.prefill_tokens_per_s if s else None, ".1f"), _num(s.decode_tokens_per_s if s else None, ".1f")]


_CUDA_COLUMNS = ("peak CUDA alloc MiB", "peak CUDA reserved MiB")


def _has_cuda(report: Report) -> bool:
    return any(row.peak_cuda_allocated_bytes is not None for row in (report.original, *report.candidates))


def _cuda_cells(row: ModelMetrics) -> list[str]:
    return [_mib(row.peak_cuda_allocated_bytes), _mib(row.peak_cuda_reserved_bytes)]


def _rows(report: Report) -> list[list[str]]:
    speed = _has_speed(report)
    cuda = _has_cuda(report)
    return [
        _row_cells(report.original, row) + (_speed_cells(row) if speed else []) + (_cuda_cells(row) if cuda else [])
        for row in (report.original, *report.candidates)
    ]


def _rss_note(report: Report) -> str | None:
    rows = (report.original, *report.candidates)
    if all(row.peak_rss_reset_supported for row in rows):
        return None
    return "* peak RSS is the process-lifetime peak: this system does not allow resetting the high-water mark"


def _gate_line(gate: GateResult) -> str:
    return f"{'PASS' if gate.passed else 'FAIL'}  {gate.message}"


def format_terminal_table(report: Report) -> str:
    """A fixed-width table of every row, followed by one PASS/FAIL line per gate.

    Args:
        report: The report.

    Returns:
        The table as a multi-line string (no trailing newline).
    """
    rows = _rows(report)
    columns = _columns(report)
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest])

    lines = [line(columns), "  ".join("-" * width for width in widths), *(line(row) for row in rows)]
    note = _rss_note(report)
    if note:
        lines.append(note)
    if report.gates:
        lines.append("")
        lines.extend(_gate_line(gate) for gate in report.gates)
        lines.append(f"gates: {'PASS' if all(g.passed for g in report.gates) else 'FAIL'}")
    return "\n".join(lines)


def _md_table(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _md_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _detail_rows(original: ModelMetrics, candidates: list[ModelMetrics]) -> list[list[str]]:
    """Markdown rows with the figures the terminal table leaves out."""
    rows = []
    for row in (original, *candidates):
        is_original = row is original
        rows.append(
            [
                row.name,
                _num(row.ppl.nll if row.ppl else None, ".4f"),
                "-" if is_original else _num(mc_acc_delta_pts(original, row), "+.2f"),
                _num(row.fidelity.max_kl if row.fidelity else None, ".4g"),
                _mib(row.artifact_bytes_disk),
                "-" if is_original else _num(disk_size_ratio(original, row), ".3f"),
                "-" if is_original else _num(memory_size_ratio(original, row), ".3f"),
                f"{row.eval_seconds:.1f}",
            ]
        )
    return rows


def _flat_items(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dict -> dotted (key, scalar-or-list) pairs."""
    if not isinstance(value, dict):
        return [(prefix, value)]
    items: list[tuple[str, Any]] = []
    for key, item in value.items():
        items += _flat_items(item, f"{prefix}.{key}" if prefix else str(key))
    return items


def _extra_sections(candidates: list[ModelMetrics]) -> list[str]:
    """One section per candidate with the facts its producer attached (``extra``)."""
    out: list[str] = []
    for candidate in candidates:
        if not candidate.extra:
            continue
        out += ["", f"## {candidate.name}: how it was made", ""]
        for key, value in _flat_items(candidate.extra):
            if key.startswith(f"quantization.{SQNR_KEY}."):
                continue  # its own section: Worst layers
            if isinstance(value, list) and value and isinstance(value[0], dict):
                value = "; ".join(", ".join(f"{k}={v}" for k, v in entry.items()) for entry in value)
            out.append(f"- **{key}**: {_md_value(value)}")
    return out


_GATE_HEADER = ("result", "candidate", "gate", "metric", "value", "threshold")


def _gate_rows(report: Report) -> list[list[str]]:
    return [
        [
            "PASS" if g.passed else "FAIL",
            g.candidate,
            g.gate,
            g.metric,
            _num(g.value if math.isfinite(g.value) else None, ".4g"),
            f"{g.threshold:g}",
        ]
        for g in report.gates
    ]


# ----------------------------------------------------------------------------- weight SQNR (worst layers)

SQNR_KEY = "weight_sqnr"
"""Key of the compact SQNR summary in a row's ``extra["quantization"]``."""
WORST_MODULES = 10
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def weight_sqnr_summary(modules: list[dict], worst: int = WORST_MODULES) -> dict | None:
    """The compact form of per-module weight SQNRs that a report row carries.

    Args:
        modules: ``QuantizationReport.to_dict()["modules"]`` entries (``name``, ``kind``,
            ``quantized``, ``sqnr_db``, ``expert_sqnr_db``).
        worst: How many of the lowest-SQNR modules to list.

    Returns:
        ``None`` when no quantized module has a finite ``sqnr_db`` (e.g. bitsandbytes), else
        ``modules`` (count measured), ``min_db``, ``median_db``, ``worst_modules`` (lowest first:
        ``name``, ``kind``, ``sqnr_db`` and for fused experts ``worst_expert`` and
        ``worst_expert_sqnr_db``) and ``per_layer`` (model order: ``layer`` (decoder layer index, or
        ``None`` outside the layers), ``modules``, ``min_sqnr_db``, ``module``, and for layers with
        experts ``worst_expert_sqnr_db``).
    """
    measured = [m for m in modules if m.get("quantized") and _finite_number(m.get("sqnr_db")) is not None]
    if not measured:
        return None

    def worst_expert(m: dict) -> tuple[int, float] | None:
        values = [(i, v) for i, v in enumerate(m.get("expert_sqnr_db") or []) if _finite_number(v) is not None]
        return min(values, key=lambda iv: iv[1]) if values else None

    entries = []
    for m in sorted(measured, key=lambda m: m["sqnr_db"])[:worst]:
        entry = {"name": m["name"], "kind": m["kind"], "sqnr_db": m["sqnr_db"]}
        expert = worst_expert(m)
        if expert is not None:
            entry["worst_expert"], entry["worst_expert_sqnr_db"] = expert
        entries.append(entry)
    layers: dict[int | None, dict] = {}
    for m in measured:
        match = _LAYER.search(m["name"])
        key = int(match.group(1)) if match else None
        group = layers.setdefault(key, {"layer": key, "modules": 0, "min_sqnr_db": math.inf, "module": None})
        group["modules"] += 1
        if m["sqnr_db"] < group["min_sqnr_db"]:
            group["min_sqnr_db"], group["module"] = m["sqnr_db"], m["name"]
        expert = worst_expert(m)
        if expert is not None and expert[1] < group.get("worst_expert_sqnr_db", math.inf):
            group["worst_expert_sqnr_db"] = expert[1]
    values = [m["sqnr_db"] for m in measured]
    return {
        "modules": len(measured),
        "min_db": min(values),
        "median_db": statistics.median(values),
        "worst_modules": entries,
        "per_layer": [layers[k] for k in sorted(layers, key=lambda k: (k is None, k or 0))],
    }


def _sqnr_rows(report: Report) -> list[tuple[ModelMetrics, dict, dict | None]]:
    """(row, its quantization record, its SQNR summary or ``None``) for every row with a quantization record."""
    found = []
    for row in (report.original, *report.candidates):
        record = row.extra.get("quantization") if isinstance(row.extra, dict) else None
        if isinstance(record, dict):
            summary = record.get(SQNR_KEY)
            found.append((row, record, summary if isinstance(summary, dict) else None))
    return found


_WORST_HEADER = ("#", "module", "kind", "SQNR dB", "worst expert (SQNR dB)")
_LAYER_HEADER = ("decoder layer", "modules", "min SQNR dB", "module with the min", "worst single expert SQNR dB")


def _worst_tables(summary: dict) -> tuple[list[list[str]], list[list[str]]]:
    """Cells of the worst-modules table and of the per-layer table."""
    worst = [
        [
            str(i + 1),
            str(e["name"]),
            str(e["kind"]),
            _num(_finite_number(e.get("sqnr_db")), ".2f"),
            "-" if e.get("worst_expert") is None
            else f"expert {e['worst_expert']} ({_num(_finite_number(e.get('worst_expert_sqnr_db')), '.2f')})",
        ]
        for i, e in enumerate(summary.get("worst_modules") or [])
    ]
    layers = [
        [
            "outside the layers" if g.get("layer") is None else str(g["layer"]),
            str(g.get("modules", "-")),
            _num(_finite_number(g.get("min_sqnr_db")), ".2f"),
            str(g.get("module") or "-"),
            _num(_finite_number(g.get("worst_expert_sqnr_db")), ".2f"),
        ]
        for g in summary.get("per_layer") or []
    ]
    return worst, layers


def _sqnr_caption(row: ModelMetrics, record: dict, summary: dict | None) -> str:
    what = " ".join(str(record[k]) for k in ("method", "scheme") if record.get(k))
    if summary is None:
        return f"{row.name} ({what}): no per-module weight SQNR in its quantization record."
    return (f"{row.name} ({what}): the {len(summary.get('worst_modules') or [])} lowest weight SQNRs of "
            f"{summary.get('modules')} quantized modules (dB, higher is better; median "
            f"{_num(_finite_number(summary.get('median_db')), '.2f')} dB).")


def _worst_layers_markdown(report: Report) -> list[str]:
    rows = _sqnr_rows(report)
    if not rows:
        return []
    out = ["", "## Worst layers"]
    for row, record, summary in rows:
        out += ["", _sqnr_caption(row, record, summary)]
        if summary is None:
            continue
        worst, layers = _worst_tables(summary)
        out += ["", *_md_table(_WORST_HEADER, worst), "", "Minimum per decoder layer:", "", *_md_table(_LAYER_HEADER, layers)]
    return out


def _markdown(report: Report, data: dict) -> str:
    """Render the Markdown report."""
    out = ["# Evaluation report", ""]
    out += [f"- **{key}**: {_md_value(value)}" for key, value in data["meta"].items()]
    out += ["", "## Results", ""]
    out += _md_table(_columns(report), _rows(report))
    note = _rss_note(report)
    if note:
        out += ["", note.replace("*", "\\*", 1)]
    out += ["", "## Details", ""]
    detail_header = ["model", "nll", "Δacc pts", "max KL", "artifact MiB", "disk ratio", "memory ratio", "eval s"]
    out += _md_table(detail_header, _detail_rows(report.original, report.candidates))
    out += _extra_sections(report.candidates)
    out += _worst_layers_markdown(report)
    out += ["", "## Gates", ""]
    if report.gates:
        out += _md_table(_GATE_HEADER, _gate_rows(report))
        out += ["", f"**Overall: {'PASS' if data['passed'] else 'FAIL'}**"]
        failed = [g.message for g in report.gates if not g.passed]
        out += ["", *(f"- {message}" for message in failed)] if failed else []
    else:
        out.append("No gates were set.")
    out += ["", "## Machine", ""]
    out += [f"- **{key}**: {_md_value(value)}" for key, value in data["machine"].items()]
    out += ["", "## How each metric is measured", ""]
    out += [f"- **{key}**: {text}" for key, text in data["methods"].items()]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #333; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child, td.text { text-align: left; }
tr.pass td { background: #e6f4ea; }
tr.fail td { background: #fde7e9; }
td.pass { color: #137333; font-weight: bold; }
td.fail { color: #b3261e; font-weight: bold; }
p.overall-pass { color: #137333; font-weight: bold; font-size: 1.1em; }
p.overall-fail { color: #b3261e; font-weight: bold; font-size: 1.1em; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: .9em; }
dt { font-weight: bold; margin-top: .4em; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; font-size: .85em; }
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _html_table(header: list[str] | tuple[str, ...], rows: list[list[str]], row_classes: list[str] | None = None,
                text_columns: tuple[int, ...] = ()) -> list[str]:
    """An HTML table; cells are escaped; ``row_classes`` gives each ``<tr>`` a class."""
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr></thead>", "<tbody>"]
    for index, row in enumerate(rows):
        cls = f' class="{_esc(row_classes[index])}"' if row_classes else ""
        cells = "".join(
            f'<td class="text">{_esc(cell)}</td>' if i in text_columns else f"<td>{_esc(cell)}</td>"
            for i, cell in enumerate(row)
        )
        out.append(f"<tr{cls}>{cells}</tr>")
    out += ["</tbody>", "</table>"]
    return out


def _html_items(items: list[tuple[str, Any]]) -> list[str]:
    """A definition list; dicts and lists are shown as indented JSON."""
    out = ["<dl>"]
    for key, value in items:
        if isinstance(value, (dict, list)):
            text = json.dumps(value, indent=2, default=str, allow_nan=True)
            block = f"<pre>{_esc(text)}</pre>"
            lines = text.count("\n") + 1
            if lines > 12:  # long: folded (a plain <details>, no script)
                block = f"<details><summary>{lines} lines</summary>{block}</details>"
            out.append(f"<dt>{_esc(key)}</dt><dd>{block}</dd>")
        else:
            out.append(f"<dt>{_esc(key)}</dt><dd>{_esc(_md_value(value))}</dd>")
    return out + ["</dl>"]


def _plot_caption(path: Path) -> str:
    return path.stem.replace("_", " ")


_PLOT_ORDER = ("accuracy_vs_size", "layer_error", "calibration_loss", "expert_sqnr", "expert_tokens")


def _plot_files(out_dir: Path) -> list[Path]:
    """The PNGs in ``out_dir/plots``: the known plots in reading order, then any others by name."""
    rank = {name: i for i, name in enumerate(_PLOT_ORDER)}
    return sorted((out_dir / "plots").glob("*.png"), key=lambda p: (rank.get(p.stem, len(rank)), p.name))


def _html(report: Report, data: dict, plots: list[Path]) -> str:
    """Render the self-contained HTML page (styles inline, plots as data URIs, no scripts)."""
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>dsq evaluation report{_esc(' — ' + str(data['meta']['model'])) if data['meta'].get('model') else ''}</title>",
           f"<style>{_CSS}</style>", "</head>", "<body>", "<h1>Evaluation report</h1>"]
    out += _html_items(list(data["meta"].items()))
    out += ["<h2>Results</h2>"]
    out += _html_table(_columns(report), _rows(report))
    note = _rss_note(report)
    if note:
        out.append(f"<p>{_esc(note)}</p>")
    out += ["<h2>Details</h2>"]
    detail_header = ["model", "nll", "Δacc pts", "max KL", "artifact MiB", "disk ratio", "memory ratio", "eval s"]
    out += _html_table(detail_header, _detail_rows(report.original, report.candidates))
    out += ["<h2>Gates</h2>"]
    if report.gates:
        classes = [f"gate {'pass' if g.passed else 'fail'}" for g in report.gates]
        rows = _gate_rows(report)
        table = _html_table(_GATE_HEADER, rows, classes, text_columns=(1, 2, 3))
        out += [line.replace("<td>PASS</td>", '<td class="pass">PASS</td>').replace("<td>FAIL</td>", '<td class="fail">FAIL</td>')
                for line in table]
        passed = data["passed"]
        out.append(f'<p class="overall-{"pass" if passed else "fail"}">Overall: {"PASS" if passed else "FAIL"}</p>')
        failed = [g.message for g in report.gates if not g.passed]
        if failed:
            out += ["<ul>", *(f"<li>{_esc(m)}</li>" for m in failed), "</ul>"]
    else:
        out.append("<p>No gates were set.</p>")
    sqnr_rows = _sqnr_rows(report)
    if sqnr_rows:
        out.append("<h2>Worst layers</h2>")
        for row, record, summary in sqnr_rows:
            out.append(f"<p>{_esc(_sqnr_caption(row, record, summary))}</p>")
            if summary is not None:
                worst, layers = _worst_tables(summary)
                out += _html_table(_WORST_HEADER, worst, text_columns=(1, 2, 4))
                out.append("<p>Minimum per decoder layer:</p>")
                out += _html_table(_LAYER_HEADER, layers, text_columns=(3,))
    if plots:
        out.append("<h2>Plots</h2>")
        for path in plots:
            encoded = base64.b64encode(path.read_bytes()).decode("ascii")
            out += ["<figure>", f'<img src="data:image/png;base64,{encoded}" alt="{_esc(_plot_caption(path))}">',
                    f"<figcaption>{_esc(path.name)}</figcaption>", "</figure>"]
    for candidate in report.candidates:
        if candidate.extra:
            items = [(k, v) for k, v in _flat_items(candidate.extra) if not k.startswith(f"quantization.{SQNR_KEY}.")]
            out.append(f"<h2>{_esc(candidate.name)}: how it was made</h2>")
            out += _html_items(items)
    out.append("<h2>Machine</h2>")
    out += _html_items(list(data["machine"].items()))
    out.append("<h2>How each metric is measured</h2>")
    out += _html_items(list(data["methods"].items()))
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def write_html_report(report: Report, out_dir: Path | str, plots: list[Path] | None = None) -> Path:
    """Write ``report.html`` into ``out_dir``: one self-contained page (no scripts, no external files).

    Args:
        report: The report.
        out_dir: Output directory (created if missing).
        plots: PNGs to embed as data URIs (default: every ``out_dir/plots/*.png``, the known plots first).

    Returns:
        The HTML path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if plots is None:
        plots = _plot_files(out_dir)
    path = out_dir / "report.html"
    path.write_text(_html(report, report_to_dict(report), list(plots)), encoding="utf-8")
    return path


def write_report(report: Report, out_dir: Path | str) -> tuple[Path, Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``out_dir`` (created if missing).

    ``report.html`` embeds the PNGs already in ``out_dir/plots``; call :func:`write_html_report`
    again after writing plots.

    Args:
        report: The report.
        out_dir: Output directory.

    Returns:
        Paths of the JSON and Markdown files (the HTML file is beside them).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = report_to_dict(report)
    json_path = out_dir / "report.json"
    md_path = out_dir / "report.md"
    json_path.write_text(json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")
    md_path.write_text(_markdown(report, data))
    (out_dir / "report.html").write_text(_html(report, data, _plot_files(out_dir)), encoding="utf-8")
    return json_path, md_path
