"""The report's tables as text cells, shared by the terminal table, ``report.md`` and ``report.html``."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dsq.eval.facts import SQNR_KEY, finite_number
from dsq.eval.gates import GateResult, disk_size_ratio, mc_acc_delta_pts, memory_size_ratio, ppl_increase_pct
from dsq.eval.harness import ModelMetrics
from dsq.eval.report import Report

_MIB = 1024 * 1024

COLUMNS = ("model", "ppl", "Δppl%", "acc", "acc_norm", "top1", "KL", "weights MiB", "disk MiB", "peak RSS MiB")
_SPEED_COLUMNS = ("prefill tok/s", "decode tok/s")
_CUDA_COLUMNS = ("peak CUDA alloc MiB", "peak CUDA reserved MiB")
DETAIL_HEADER = ("model", "nll", "Δacc pts", "max KL", "artifact MiB", "disk ratio", "memory ratio", "eval s")
GATE_HEADER = ("result", "candidate", "gate", "metric", "value", "threshold")
WORST_HEADER = ("#", "module", "kind", "SQNR dB", "worst expert (SQNR dB)")
LAYER_HEADER = ("decoder layer", "modules", "min SQNR dB", "module with the min", "worst single expert SQNR dB")
ROUNDING_HEADER = ("block", "loss before (RTN)", "loss after", "change %", "steps", "RTN kept")
_ROUNDING_KEYS = ("loss_before", "loss_after", "steps", "kept_rtn")  # what the learned-rounding table shows
_GIB = 1 << 30


def num(value: float | None, spec: str) -> str:
    """Format a number, ``-`` when missing."""
    return "-" if value is None else format(value, spec)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / _MIB:.1f}"


def scalar_text(value: object) -> str:
    """A fact's value as text: floats to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ----------------------------------------------------------------------------- results


def _row_cells(original: ModelMetrics, row: ModelMetrics) -> list[str]:
    """Cells of one row, in :data:`COLUMNS` order."""
    is_original = row is original
    return [
        row.name,
        num(row.ppl.ppl if row.ppl else None, ".3f"),
        "-" if is_original else num(ppl_increase_pct(original, row), "+.2f"),
        num(row.mc.acc if row.mc else None, ".4f"),
        num(row.mc.acc_norm if row.mc else None, ".4f"),
        num(row.fidelity.top1_agreement if row.fidelity else None, ".4f"),
        num(row.fidelity.mean_kl if row.fidelity else None, ".4g"),
        _mib(row.weight_bytes_memory),
        _mib(row.weight_bytes_disk),
        _mib(row.peak_rss_bytes) + ("" if row.peak_rss_reset_supported else "*"),
    ]


def _has_speed(report: Report) -> bool:
    return any(row.speed is not None for row in report.rows)


def _has_cuda(report: Report) -> bool:
    return any(row.peak_cuda_allocated_bytes is not None for row in report.rows)


def columns(report: Report) -> tuple[str, ...]:
    """The results table's header: speed and CUDA columns only when some row measured them."""
    return COLUMNS + (_SPEED_COLUMNS if _has_speed(report) else ()) + (_CUDA_COLUMNS if _has_cuda(report) else ())


def _speed_cells(row: ModelMetrics) -> list[str]:
    s = row.speed
    return [num(s.prefill_tokens_per_s if s else None, ".1f"), num(s.decode_tokens_per_s if s else None, ".1f")]


def _cuda_cells(row: ModelMetrics) -> list[str]:
    return [_mib(row.peak_cuda_allocated_bytes), _mib(row.peak_cuda_reserved_bytes)]


def rows(report: Report) -> list[list[str]]:
    """The results table's cells, one list per row (original first), in :func:`columns` order."""
    speed = _has_speed(report)
    cuda = _has_cuda(report)
    return [
        _row_cells(report.original, row) + (_speed_cells(row) if speed else []) + (_cuda_cells(row) if cuda else [])
        for row in report.rows
    ]


def rss_note(report: Report) -> str | None:
    """The footnote of a peak RSS that could not be reset (marked ``*``), if any row has one."""
    if all(row.peak_rss_reset_supported for row in report.rows):
        return None
    return "* peak RSS is the process-lifetime peak: this system does not allow resetting the high-water mark"


def detail_rows(report: Report) -> list[list[str]]:
    """Cells with the figures the results table leaves out, in :data:`DETAIL_HEADER` order."""
    original = report.original
    out = []
    for row in report.rows:
        is_original = row is original
        out.append(
            [
                row.name,
                num(row.ppl.nll if row.ppl else None, ".4f"),
                "-" if is_original else num(mc_acc_delta_pts(original, row), "+.2f"),
                num(row.fidelity.max_kl if row.fidelity else None, ".4g"),
                _mib(row.artifact_bytes_disk),
                "-" if is_original else num(disk_size_ratio(original, row), ".3f"),
                "-" if is_original else num(memory_size_ratio(original, row), ".3f"),
                f"{row.eval_seconds:.1f}",
            ]
        )
    return out


def _context_label(tokens: int) -> str:
    """``4k``, ``128k``: a context length in units of 1024 tokens."""
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def serving_header(report: Report) -> tuple[str, ...]:
    """The serving-memory table's header: the cache, its bytes per token, the weights and a total per context length."""
    contexts = next((row.serving_memory.contexts for row in report.rows if row.serving_memory is not None), ())
    return ("model", "KV cache", "KV bytes/token", "weights MiB",
            *(f"total @{_context_label(c.context)} GiB" for c in contexts))


def serving_rows(report: Report) -> list[list[str]]:
    """Cells of the serving-memory table (:func:`serving_header`) for every row that has the figures (empty: none has)."""
    out = []
    for row in report.rows:
        m = row.serving_memory
        if m is not None:
            out.append([row.name, m.kv_cache, f"{m.kv_bytes_per_token:,}", _mib(m.weight_bytes),
                        *(f"{c.total_bytes / _GIB:.3f}" for c in m.contexts)])
    return out


def serving_caption(report: Report) -> str | None:
    """The sentence above the serving-memory table (None: no row has the figures)."""
    found = [row.serving_memory for row in report.rows if row.serving_memory is not None]
    if not found:
        return None
    layouts = sorted({m.layout for m in found})
    return (f"Weights in memory plus the KV cache of one sequence (batch 1) at each context length. Per token the cache "
            f"holds {'; '.join(layouts)} elements: one byte each when the KV cache is quantized, else the model's dtype.")


def gate_rows(report: Report) -> list[list[str]]:
    """Cells of the gates table, in :data:`GATE_HEADER` order."""
    return [
        [
            "PASS" if g.passed else "FAIL",
            g.candidate,
            g.gate,
            g.metric,
            num(g.value if math.isfinite(g.value) else None, ".4g"),
            f"{g.threshold:g}",
        ]
        for g in report.gates
    ]


def _gate_line(gate: GateResult) -> str:
    return f"{'PASS' if gate.passed else 'FAIL'}  {gate.message}"


def _aligned(header: tuple[str, ...], cells: list[list[str]]) -> list[str]:
    """A fixed-width table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]

    def line(row: list[str] | tuple[str, ...]) -> str:
        return "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))])

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in cells)]


def format_terminal_table(report: Report) -> str:
    """A fixed-width table of every row, followed by one PASS/FAIL line per gate.

    Args:
        report: The report.

    Returns:
        The table as a multi-line string (no trailing newline).
    """
    cells = rows(report)
    header = columns(report)
    widths = [max(len(column), *(len(row[i]) for row in cells)) for i, column in enumerate(header)]

    def line(row: list[str] | tuple[str, ...]) -> str:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "  ".join([first, *rest])

    lines = [line(header), "  ".join("-" * width for width in widths), *(line(row) for row in cells)]
    note = rss_note(report)
    if note:
        lines.append(note)
    serving = serving_rows(report)
    if serving:
        lines += ["", "serving memory (batch 1, weights + KV cache):", *_aligned(serving_header(report), serving)]
    if report.gates:
        lines.append("")
        lines.extend(_gate_line(gate) for gate in report.gates)
        lines.append(f"gates: {'PASS' if report.passed else 'FAIL'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- how each row was made


def _flat_items(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dict -> dotted (key, scalar-or-list) pairs."""
    if not isinstance(value, dict):
        return [(prefix, value)]
    items: list[tuple[str, Any]] = []
    for key, item in value.items():
        items += _flat_items(item, f"{prefix}.{key}" if prefix else str(key))
    return items


def made_with(facts: dict) -> list[tuple[str, Any]]:
    """A row's stage facts (:meth:`ModelMetrics.facts_dict`) as dotted (key, value) pairs, left out what
    has its own section: the weight SQNR summary (Worst layers) and the per-block learned-rounding
    losses (Learned rounding per block)."""
    blocks = learned_rounding_blocks(facts.get("quantization") or {})
    shown = {f"quantization.calibration.modules.{name}.{key}" for name in blocks for key in _ROUNDING_KEYS}
    return [(key, value) for key, value in _flat_items(facts)
            if not key.startswith(f"quantization.{SQNR_KEY}.") and key not in shown]


# ----------------------------------------------------------------------------- weight SQNR (worst layers)


def sqnr_rows(report: Report) -> list[tuple[ModelMetrics, dict, dict | None]]:
    """(row, its ``extra.quantization``, its SQNR summary or ``None``) for every row that has one."""
    found = []
    for row in report.rows:
        record = row.quantization.to_dict() if row.quantization is not None else None
        if record is not None:
            summary = record.get(SQNR_KEY)
            found.append((row, record, summary if isinstance(summary, dict) else None))
    return found


def _worst_expert_cell(entry: dict) -> str:
    if entry.get("worst_expert") is None:
        return "-"
    return f"expert {entry['worst_expert']} ({num(finite_number(entry.get('worst_expert_sqnr_db')), '.2f')})"


def worst_tables(summary: dict) -> tuple[list[list[str]], list[list[str]]]:
    """Cells of the worst-modules table (:data:`WORST_HEADER`) and of the per-layer table (:data:`LAYER_HEADER`)."""
    worst = [
        [str(i + 1), str(e["name"]), str(e["kind"]), num(finite_number(e.get("sqnr_db")), ".2f"), _worst_expert_cell(e)]
        for i, e in enumerate(summary.get("worst_modules") or [])
    ]
    layers = [
        [
            "outside the layers" if g.get("layer") is None else str(g["layer"]),
            str(g.get("modules", "-")),
            num(finite_number(g.get("min_sqnr_db")), ".2f"),
            str(g.get("module") or "-"),
            num(finite_number(g.get("worst_expert_sqnr_db")), ".2f"),
        ]
        for g in summary.get("per_layer") or []
    ]
    return worst, layers


def sqnr_caption(row: ModelMetrics, record: dict, summary: dict | None) -> str:
    """The sentence above a row's worst-layers tables."""
    what = " ".join(str(record[k]) for k in ("method", "scheme") if record.get(k))
    if summary is None:
        return f"{row.name} ({what}): no per-module weight SQNR in its quantization record."
    return (f"{row.name} ({what}): the {len(summary.get('worst_modules') or [])} lowest weight SQNRs of "
            f"{summary.get('modules')} quantized modules (dB, higher is better; median "
            f"{num(finite_number(summary.get('median_db')), '.2f')} dB).")


# ----------------------------------------------------------------------------- learned rounding per block


def learned_rounding_blocks(record: Mapping[str, Any]) -> dict[str, dict]:
    """The ``calibration.modules`` entries of a quantization record that hold a learned-rounding loss
    (``loss_before`` and ``loss_after``, autoround: one per decoder block, and ``lm_head``), by name."""
    calibration = record.get("calibration")
    modules = calibration.get("modules") if isinstance(calibration, dict) else None
    if not isinstance(modules, dict):
        return {}
    return {str(name): fields for name, fields in modules.items()
            if isinstance(fields, dict) and "loss_before" in fields and "loss_after" in fields}


def rounding_rows(report: Report) -> list[tuple[ModelMetrics, dict, dict[str, dict]]]:
    """(row, its quantization record, its :func:`learned_rounding_blocks`) for every row that has some."""
    found = []
    for row in report.rows:
        record = dict(row.quantization.record) if row.quantization is not None else {}
        blocks = learned_rounding_blocks(record)
        if blocks:
            found.append((row, record, blocks))
    return found


def _change_pct(before: float | None, after: float | None) -> float | None:
    """``after`` relative to ``before`` in percent; ``None`` without both or with ``before`` 0."""
    if before is None or after is None or before == 0:
        return None
    return 100.0 * (after - before) / before


def rounding_table(blocks: dict[str, dict]) -> list[list[str]]:
    """Cells of the learned-rounding table (:data:`ROUNDING_HEADER`), one row per block in record order."""
    out = []
    for name, fields in blocks.items():
        before, after = finite_number(fields.get("loss_before")), finite_number(fields.get("loss_after"))
        kept = fields.get("kept_rtn")
        out.append([
            name, num(before, ".4g"), num(after, ".4g"), num(_change_pct(before, after), "+.1f"),
            str(fields.get("steps", "-")), "-" if not isinstance(kept, bool) else ("yes" if kept else "no"),
        ])
    return out


def rounding_caption(row: ModelMetrics, record: dict, blocks: dict[str, dict]) -> str:
    """The sentence above a row's learned-rounding table."""
    what = " ".join(str(record[k]) for k in ("method", "scheme") if record.get(k))
    kept = sum(1 for fields in blocks.values() if fields.get("kept_rtn") is True)
    return (f"{row.name} ({what}): output MSE of each block against full precision on the calibration data, "
            f"with round-to-nearest and with the learned rounding that was kept (lower is better); "
            f"round-to-nearest kept in {kept} of {len(blocks)} blocks.")
