"""Writing a report: ``report.json``, ``report.md``, ``plots/*.png`` and ``report.html``, each file once."""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dsq.eval.plots import DrawnPlots, draw_plots
from dsq.eval.report import NotEvaluatedReport, Report, report_to_dict
from dsq.eval.report_html import render_html
from dsq.eval.report_markdown import render_markdown, render_not_evaluated_markdown

log = logging.getLogger("dsq.eval.plots")

PLOTS_DIR = "plots"


@dataclass(frozen=True)
class WrittenReport:
    """The files :func:`write_report` wrote.

    Attributes:
        json: ``report.json``.
        markdown: ``report.md``.
        html: ``report.html`` (``None`` for a :class:`NotEvaluatedReport`).
        plots: ``plots/*.png``, in reading order.
        skipped_plots: Plot name -> why it was not drawn (empty when plots were not drawn at all).
    """

    json: Path
    markdown: Path
    html: Path | None = None
    plots: tuple[Path, ...] = ()
    skipped_plots: Mapping[str, str] = field(default_factory=dict)


def _write_plots(directory: Path, drawn: DrawnPlots) -> tuple[Path, ...]:
    """Write the drawn PNGs; a skipped plot's PNG left from an earlier report there is removed."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for plot in drawn.plots:
        path = directory / plot.file_name
        path.write_bytes(plot.png)
        log.info("plot %s written: %s", plot.name, path)
        paths.append(path)
    for name in drawn.skipped:
        (directory / f"{name}.png").unlink(missing_ok=True)
    return tuple(paths)


def _write_evaluated(report: Report, root: Path, plots: bool) -> WrittenReport:
    data = report_to_dict(report)
    json_path = root / "report.json"
    json_path.write_text(json.dumps(data, indent=2, allow_nan=False, default=str) + "\n", encoding="utf-8")
    md_path = root / "report.md"
    md_path.write_text(render_markdown(report, data), encoding="utf-8")
    drawn = draw_plots(report) if plots else None
    pngs = _write_plots(root / PLOTS_DIR, drawn) if drawn is not None else ()
    html_path = root / "report.html"
    html_path.write_text(render_html(report, data, drawn.plots if drawn is not None else ()), encoding="utf-8")
    return WrittenReport(json_path, md_path, html_path, pngs, dict(drawn.skipped) if drawn is not None else {})


def _write_not_evaluated(report: NotEvaluatedReport, root: Path) -> WrittenReport:
    data = report_to_dict(report)
    json_path = root / "report.json"
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    md_path = root / "report.md"
    md_path.write_text(render_not_evaluated_markdown(report, data["quantization"]), encoding="utf-8")
    return WrittenReport(json_path, md_path)


def write_report(report: Report | NotEvaluatedReport, root: Path | str, *, plots: bool = True) -> WrittenReport:
    """Write every file of ``report`` into ``root`` (created if missing), each file once, from memory.

    A :class:`Report` gives ``report.json``, ``report.md``, the plots that apply (``plots/*.png``,
    when ``plots`` is set and matplotlib is installed; :data:`dsq.eval.plots.PLOT_NAMES`) and
    ``report.html`` with those plots embedded. A :class:`NotEvaluatedReport` gives ``report.json``
    and ``report.md``.

    Args:
        report: The report.
        root: Output directory.
        plots: Draw the plots.

    Returns:
        The paths written, and the plots skipped with their reasons.

    Example:
        >>> write_report(Report(original, candidates, check_gates(gates, original, candidates), meta), tmp)
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if isinstance(report, NotEvaluatedReport):
        return _write_not_evaluated(report, root)
    return _write_evaluated(report, root, plots)

