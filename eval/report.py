"""Evaluation report: JSON for machines, Markdown for people, a fixed-width terminal table."""
from __future__ import annotations

import json
import math
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
            "zero-shot log-likelihood scoring as in lm-evaluation-harness: each choice's summed token "
            "log-probability given the context; acc = argmax of the sum, acc_norm = argmax of the sum "
            "divided by the choice's length in UTF-8 bytes"
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
    }


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
    return _COLUMNS + (_SPEED_COLUMNS if _has_speed(report) else ())


def _speed_cells(row: ModelMetrics) -> list[str]:
    s = row.speed
    return [_num(s.prefill_tokens_per_s if s else None, ".1f"), _num(s.decode_tokens_per_s if s else None, ".1f")]


def _rows(report: Report) -> list[list[str]]:
    speed = _has_speed(report)
    return [
        _row_cells(report.original, row) + (_speed_cells(row) if speed else [])
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
            if isinstance(value, list) and value and isinstance(value[0], dict):
                value = "; ".join(", ".join(f"{k}={v}" for k, v in entry.items()) for entry in value)
            out.append(f"- **{key}**: {_md_value(value)}")
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
    out += ["", "## Gates", ""]
    if report.gates:
        gate_rows = [
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
        out += _md_table(["result", "candidate", "gate", "metric", "value", "threshold"], gate_rows)
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


def write_report(report: Report, out_dir: Path | str) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir`` (created if missing).

    Args:
        report: The report.
        out_dir: Output directory.

    Returns:
        Paths of the JSON and Markdown files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = report_to_dict(report)
    json_path = out_dir / "report.json"
    md_path = out_dir / "report.md"
    json_path.write_text(json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")
    md_path.write_text(_markdown(report, data))
    return json_path, md_path
