"""PNG plots of a report: accuracy versus size, per-module weight SQNR, calibration losses,
per-expert SQNR, per-expert tokens.

Every plot is drawn on a :class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot, no
global state, no display needed) from the report in memory; matplotlib is imported only when a
plot is drawn, so this module imports without it. Each figure has its module:

* :func:`accuracy_vs_size` (:mod:`dsq.eval.plot_accuracy`): from :class:`dsq.eval.report.Report` objects;
* :func:`layer_error`, :func:`calibration_loss` (:mod:`dsq.eval.plot_layer_error`),
  :func:`expert_sqnr` and :func:`expert_tokens` (:mod:`dsq.eval.plot_experts`): from a quantization
  record (``QuantizationReport.to_dict()``), the first report row's with quantization facts.

A plot whose data is absent raises :class:`MissingPlotData` with the reason; :func:`draw_plots`
turns that into a logged skip listed in the result's ``skipped``.
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dsq.eval.plot_accuracy import accuracy_vs_size
from dsq.eval.plot_common import MissingPlotData, Plot, png_bytes
from dsq.eval.plot_experts import expert_sqnr, expert_tokens
from dsq.eval.plot_layer_error import WEIGHT_ERROR_KEYS, calibration_loss, layer_error
from dsq.eval.report import Report

log = logging.getLogger(__name__)

PLOT_NAMES = ("accuracy_vs_size", "layer_error", "calibration_loss", "expert_sqnr", "expert_tokens")
"""Every plot, in reading order."""

_RECORD_PLOTS: dict[str, Callable[[dict], Any]] = {
    "layer_error": lambda record: layer_error(record, metrics=WEIGHT_ERROR_KEYS),
    "calibration_loss": calibration_loss,
    "expert_sqnr": expert_sqnr,
    "expert_tokens": expert_tokens,
}


@dataclass(frozen=True)
class DrawnPlots:
    """The plots that apply to a report.

    Attributes:
        plots: The drawn ones, in :data:`PLOT_NAMES` order.
        skipped: Plot name -> why it was not drawn, for every other one.
    """

    plots: tuple[Plot, ...]
    skipped: Mapping[str, str]


def _record_of(report: Report) -> tuple[dict | None, str]:
    """The quantization record of the first row that has one, and where it comes from."""
    for row in report.rows:
        if row.quantization is not None:
            return dict(row.quantization.record), row.quantization.source
    return None, ""


def _draw(name: str, report: Report, record: dict | None) -> Any:
    if name == "accuracy_vs_size":
        return accuracy_vs_size([report])
    if record is None:
        raise MissingPlotData("no quantization record (no row of the report carries quantization facts)")
    return _RECORD_PLOTS[name](record)


def draw_plots(report: Report) -> DrawnPlots | None:
    """Draw every plot that applies to ``report``; ``None`` (with a warning) without matplotlib.

    A plot whose data is absent is skipped: the reason is logged (warning) and kept in ``skipped``.

    Args:
        report: The report; the record plots read the first row with quantization facts.

    Returns:
        The PNG images with their names, and the skipped plots with their reasons.
    """
    if importlib.util.find_spec("matplotlib") is None:
        log.warning("matplotlib is not installed: no plots written (pip install 'dsq[plots]')")
        return None
    record, source = _record_of(report)
    plots: list[Plot] = []
    skipped: dict[str, str] = {}
    for name in PLOT_NAMES:
        try:
            figure = _draw(name, report, record)
        except MissingPlotData as exc:
            reason = f"{exc} [from {source}]" if source and name != "accuracy_vs_size" else str(exc)
            skipped[name] = reason
            log.warning("plot %s skipped: %s", name, reason)
            continue
        plots.append(Plot(name, png_bytes(figure)))
    return DrawnPlots(tuple(plots), skipped)


__all__ = [
    "PLOT_NAMES", "DrawnPlots", "MissingPlotData", "Plot", "accuracy_vs_size", "calibration_loss", "draw_plots",
    "expert_sqnr", "expert_tokens", "layer_error", "png_bytes",
]
