"""``report.md``: the report for people, as Markdown."""
from __future__ import annotations

from dsq.eval.report import NotEvaluatedReport, Report
from dsq.eval.report_tables import (
    DETAIL_HEADER, GATE_HEADER, LAYER_HEADER, ROUNDING_HEADER, WORST_HEADER, columns, detail_rows, gate_rows, made_with,
    rounding_caption, rounding_rows, rounding_table, rows, rss_note, scalar_text, serving_caption, serving_header,
    serving_rows, sqnr_caption, sqnr_rows, worst_tables,
)


def _table(header: list[str] | tuple[str, ...], cells: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in cells),
    ]


def _made_with_sections(report: Report) -> list[str]:
    """One section per candidate with the facts of the stages that made it."""
    out: list[str] = []
    for candidate in report.candidates:
        facts = candidate.facts_dict()
        if not facts:
            continue
        out += ["", f"## {candidate.name}: how it was made", ""]
        for key, value in made_with(facts):
            if isinstance(value, list) and value and isinstance(value[0], dict):
                value = "; ".join(", ".join(f"{k}={v}" for k, v in entry.items()) for entry in value)
            out.append(f"- **{key}**: {scalar_text(value)}")
    return out


def _worst_layers(report: Report) -> list[str]:
    found = sqnr_rows(report)
    if not found:
        return []
    out = ["", "## Worst layers"]
    for row, record, summary in found:
        out += ["", sqnr_caption(row, record, summary)]
        if summary is None:
            continue
        worst, layers = worst_tables(summary)
        out += ["", *_table(WORST_HEADER, worst), "", "Minimum per decoder layer:", "", *_table(LAYER_HEADER, layers)]
    return out


def _learned_rounding(report: Report) -> list[str]:
    found = rounding_rows(report)
    if not found:
        return []
    out = ["", "## Learned rounding per block"]
    for row, record, blocks in found:
        out += ["", rounding_caption(row, record, blocks), "", *_table(ROUNDING_HEADER, rounding_table(blocks))]
    return out


def _serving(report: Report) -> list[str]:
    caption = serving_caption(report)
    if caption is None:
        return []
    return ["", "## Serving memory (batch 1)", "", caption, "", *_table(serving_header(report), serving_rows(report))]


def _gates(report: Report) -> list[str]:
    if not report.gates:
        return ["No gates were set."]
    out = _table(GATE_HEADER, gate_rows(report))
    out += ["", f"**Overall: {'PASS' if report.passed else 'FAIL'}**"]
    failed = [g.message for g in report.gates if not g.passed]
    return out + (["", *(f"- {message}" for message in failed)] if failed else [])


def render_markdown(report: Report, data: dict) -> str:
    """``report.md`` of an evaluated run.

    Args:
        report: The report.
        data: Its :func:`dsq.eval.report.report_to_dict` (meta, machine and methods are read from it).

    Returns:
        The Markdown text.
    """
    out = ["# Evaluation report", ""]
    out += [f"- **{key}**: {scalar_text(value)}" for key, value in data["meta"].items()]
    out += ["", "## Results", "", *_table(columns(report), rows(report))]
    note = rss_note(report)
    if note:
        out += ["", note.replace("*", "\\*", 1)]
    out += ["", "## Details", "", *_table(DETAIL_HEADER, detail_rows(report))]
    out += _serving(report)
    out += _made_with_sections(report)
    out += _worst_layers(report)
    out += _learned_rounding(report)
    out += ["", "## Gates", "", *_gates(report)]
    out += ["", "## Machine", ""]
    out += [f"- **{key}**: {scalar_text(value)}" for key, value in data["machine"].items()]
    out += ["", "## How each metric is measured", ""]
    out += [f"- **{key}**: {text}" for key, text in data["methods"].items()]
    return "\n".join(out) + "\n"


def render_not_evaluated_markdown(report: NotEvaluatedReport, quantization: dict) -> str:
    """``report.md`` of an artifact not evaluated here: the reason, what was quantized, every gate.

    Args:
        report: The report.
        quantization: Its ``quantization`` facts as ``report.json`` holds them.

    Returns:
        The Markdown text.
    """
    done = (f"Quantized {quantization['quantized_params']:,} parameters in {quantization['seconds']:.1f} s; "
            f"peak RSS {quantization['peak_rss_bytes'] or 0:,} bytes.")
    lines = [f"# dsq report: {report.candidate}", "", f"Evaluation {report.reason}.", "", done]
    lines += [f"- NOTE: {n}" for n in quantization.get("notes", [])]
    lines += [f"- GATE NOT EVALUATED: {g.message}" for g in report.gates]
    return "\n".join(lines) + "\n"
