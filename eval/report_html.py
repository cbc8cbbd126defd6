"""``report.html``: the report as one self-contained page (styles inline, plots as data URIs, no scripts)."""
from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from typing import Any

from dsq.eval.plot_common import Plot
from dsq.eval.report import Report
from dsq.eval.report_tables import (
    DETAIL_HEADER, GATE_HEADER, LAYER_HEADER, ROUNDING_HEADER, WORST_HEADER, columns, detail_rows, gate_rows, made_with,
    rounding_caption, rounding_rows, rounding_table, rows, rss_note, scalar_text, serving_caption, serving_header,
    serving_rows, sqnr_caption, sqnr_rows, worst_tables,
)

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
_FOLDED_LINES = 12  # a longer JSON value is folded in a <details>


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(header: Sequence[str], cells: list[list[str]], row_classes: list[str] | None = None,
           text_columns: tuple[int, ...] = ()) -> list[str]:
    """An HTML table; cells are escaped; ``row_classes`` gives each ``<tr>`` a class."""
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr></thead>", "<tbody>"]
    for index, row in enumerate(cells):
        cls = f' class="{_esc(row_classes[index])}"' if row_classes else ""
        tds = "".join(
            f'<td class="text">{_esc(cell)}</td>' if i in text_columns else f"<td>{_esc(cell)}</td>"
            for i, cell in enumerate(row)
        )
        out.append(f"<tr{cls}>{tds}</tr>")
    out += ["</tbody>", "</table>"]
    return out


def _items(items: list[tuple[str, Any]]) -> list[str]:
    """A definition list; dicts and lists are shown as indented JSON."""
    out = ["<dl>"]
    for key, value in items:
        if isinstance(value, (dict, list)):
            text = json.dumps(value, indent=2, default=str, allow_nan=True)
            block = f"<pre>{_esc(text)}</pre>"
            lines = text.count("\n") + 1
            if lines > _FOLDED_LINES:  # long: folded (a plain <details>, no script)
                block = f"<details><summary>{lines} lines</summary>{block}</details>"
            out.append(f"<dt>{_esc(key)}</dt><dd>{block}</dd>")
        else:
            out.append(f"<dt>{_esc(key)}</dt><dd>{_esc(scalar_text(value))}</dd>")
    return out + ["</dl>"]


def _head(data: dict) -> list[str]:
    model = data["meta"].get("model")
    title = f"dsq evaluation report{_esc(' — ' + str(model)) if model else ''}"
    return ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{title}</title>",
            f"<style>{_CSS}</style>", "</head>", "<body>", "<h1>Evaluation report</h1>"]


def _results(report: Report) -> list[str]:
    out = ["<h2>Results</h2>", *_table(columns(report), rows(report))]
    note = rss_note(report)
    if note:
        out.append(f"<p>{_esc(note)}</p>")
    out += ["<h2>Details</h2>", *_table(DETAIL_HEADER, detail_rows(report))]
    caption = serving_caption(report)
    if caption is not None:
        out += ["<h2>Serving memory (batch 1)</h2>", f"<p>{_esc(caption)}</p>",
                *_table(serving_header(report), serving_rows(report), text_columns=(1,))]
    return out


def _gates(report: Report) -> list[str]:
    out = ["<h2>Gates</h2>"]
    if not report.gates:
        return out + ["<p>No gates were set.</p>"]
    classes = [f"gate {'pass' if g.passed else 'fail'}" for g in report.gates]
    table = _table(GATE_HEADER, gate_rows(report), classes, text_columns=(1, 2, 3))
    out += [line.replace("<td>PASS</td>", '<td class="pass">PASS</td>').replace("<td>FAIL</td>", '<td class="fail">FAIL</td>')
            for line in table]
    verdict = "pass" if report.passed else "fail"
    out.append(f'<p class="overall-{verdict}">Overall: {verdict.upper()}</p>')
    failed = [g.message for g in report.gates if not g.passed]
    if failed:
        out += ["<ul>", *(f"<li>{_esc(m)}</li>" for m in failed), "</ul>"]
    return out


def _worst_layers(report: Report) -> list[str]:
    found = sqnr_rows(report)
    if not found:
        return []
    out = ["<h2>Worst layers</h2>"]
    for row, record, summary in found:
        out.append(f"<p>{_esc(sqnr_caption(row, record, summary))}</p>")
        if summary is not None:
            worst, layers = worst_tables(summary)
            out += _table(WORST_HEADER, worst, text_columns=(1, 2, 4))
            out.append("<p>Minimum per decoder layer:</p>")
            out += _table(LAYER_HEADER, layers, text_columns=(3,))
    return out


def _learned_rounding(report: Report) -> list[str]:
    found = rounding_rows(report)
    if not found:
        return []
    out = ["<h2>Learned rounding per block</h2>"]
    for row, record, blocks in found:
        out.append(f"<p>{_esc(rounding_caption(row, record, blocks))}</p>")
        out += _table(ROUNDING_HEADER, rounding_table(blocks), text_columns=(5,))
    return out


def _plots(plots: Sequence[Plot]) -> list[str]:
    if not plots:
        return []
    out = ["<h2>Plots</h2>"]
    for plot in plots:
        encoded = base64.b64encode(plot.png).decode("ascii")
        out += ["<figure>", f'<img src="data:image/png;base64,{encoded}" alt="{_esc(plot.name.replace("_", " "))}">',
                f"<figcaption>{_esc(plot.file_name)}</figcaption>", "</figure>"]
    return out


def _made_with(report: Report) -> list[str]:
    out: list[str] = []
    for candidate in report.candidates:
        facts = candidate.facts_dict()
        if facts:
            out.append(f"<h2>{_esc(candidate.name)}: how it was made</h2>")
            out += _items(made_with(facts))
    return out


def render_html(report: Report, data: dict, plots: Sequence[Plot]) -> str:
    """``report.html`` of an evaluated run.

    Args:
        report: The report.
        data: Its :func:`dsq.eval.report.report_to_dict` (meta, machine and methods are read from it).
        plots: The PNGs to embed, in this order.

    Returns:
        The page: every text escaped, no scripts, nothing loaded from outside.
    """
    out = _head(data)
    out += _items(list(data["meta"].items()))
    out += _results(report)
    out += _gates(report)
    out += _worst_layers(report)
    out += _learned_rounding(report)
    out += _plots(plots)
    out += _made_with(report)
    out += ["<h2>Machine</h2>", *_items(list(data["machine"].items()))]
    out += ["<h2>How each metric is measured</h2>", *_items(list(data["methods"].items()))]
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"
