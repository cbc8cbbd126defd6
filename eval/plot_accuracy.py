"""Plot: perplexity and multiple-choice accuracy against weight bytes on disk, one point per row.

Data read from each :class:`dsq.eval.report.Report`: every row's ``name``, ``weight_bytes_disk``,
``ppl.ppl``, ``mc.acc``, ``mc.acc_norm``, ``mc.n``, ``mc.num_fewshot`` and ``onnx`` (ONNX rows get
their own marker); the original's perplexity settings, ``meta["model"]`` for the title and
``meta["recipe"]["output"]`` to tell equal candidate names of several runs apart.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsq.eval.facts import finite_number
from dsq.eval.harness import ModelMetrics
from dsq.eval.plot_common import MissingPlotData, new_figure
from dsq.eval.report import Report

log = logging.getLogger("dsq.eval.plots")

_MIB = 1024 * 1024
_GIB = 1024 * _MIB


@dataclass
class _Row:
    label: str
    original: bool
    onnx: bool
    disk_bytes: int
    ppl: float | None
    acc: float | None
    acc_norm: float | None
    mc_n: int | None
    source: str = ""  # the run the row comes from (its output directory's name), to tell equal names apart


def _point(row: ModelMetrics, original: bool, source: str = "") -> _Row:
    mc = row.mc
    return _Row(
        (row.name or "original") if original else row.name, original, not original and row.onnx is not None, int(row.weight_bytes_disk),
        finite_number(row.ppl.ppl) if row.ppl else None, finite_number(mc.acc) if mc else None,
        finite_number(mc.acc_norm) if mc else None, mc.n if mc else None, source,
    )


def _same_original(a: _Row, b: _Row) -> bool:
    """Originals of several reports are one model when size and metrics agree (up to float noise)."""
    def close(x: float | None, y: float | None) -> bool:
        return x is None or y is None or math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-9)

    return a.disk_bytes == b.disk_bytes and close(a.ppl, b.ppl) and close(a.acc, b.acc)


def _source(report: Report, index: int) -> str:
    recipe = report.meta.get("recipe")
    output = recipe.get("output") if isinstance(recipe, dict) else None
    return Path(str(output)).name if output else f"report {index + 1}"


def _collect_rows(reports: Sequence[Report]) -> tuple[list[_Row], list[str]]:
    """Plot rows (originals deduplicated by their numbers) and the names of rows without a disk size."""
    rows: list[_Row] = []
    unplaced: list[str] = []
    for index, report in enumerate(reports):
        if report.original.weight_bytes_disk is None:
            unplaced.append(report.original.name)
        else:
            row = _point(report.original, True)
            if not any(r.original and _same_original(r, row) for r in rows):
                rows.append(row)
        for candidate in report.candidates:
            if candidate.weight_bytes_disk is None:
                unplaced.append(candidate.name)
            else:
                rows.append(_point(candidate, False, _source(report, index)))
    _disambiguate(rows)
    return rows, unplaced


def _disambiguate(rows: list[_Row]) -> None:
    """Candidate names that occur more than once get their run's name (or a number) appended."""
    groups: dict[str, list[_Row]] = {}
    for row in rows:
        if not row.original:
            groups.setdefault(row.label, []).append(row)
    for label, group in groups.items():
        if len(group) < 2:
            continue
        distinct = len({r.source for r in group}) == len(group)
        for i, row in enumerate(group):
            row.label = f"{label} [{row.source}]" if distinct else f"{label} #{i + 1}"


def _shots(reports: Sequence[Report]) -> str:
    """``zero-shot`` / ``k-shot`` from the rows' ``mc.num_fewshot``."""
    ks = {row.mc.num_fewshot for report in reports for row in report.rows if row.mc is not None}
    return "/".join("zero-shot" if k == 0 else f"{k}-shot" for k in sorted(ks)) or "zero-shot"


# ----------------------------------------------------------------------------- labels


def _label_boxes(ax: Any, points: list[tuple[float, float, str]]) -> list[tuple[float, float, float, float]]:
    """A small box (display pixels) around every marker, which labels should not cover."""
    boxes = []
    for x, y, _ in points:
        px, py = ax.transData.transform((x, y))
        boxes.append((px - 9, py - 9, px + 9, py + 9))
    return boxes


def _overlap(box: Any, placed: list[tuple[float, float, float, float]]) -> float:
    total = 0.0
    for x0, y0, x1, y1 in placed:
        w = min(box.x1, x1) - max(box.x0, x0)
        h = min(box.y1, y1) - max(box.y0, y0)
        if w > 0 and h > 0:
            total += w * h
    return total


def _annotate(ax: Any, x: float, y: float, text: str, dx: float, dy: float, fontsize: float) -> Any:
    return ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                       ha="left" if dx > 0 else "right", va="center",
                       arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 1, "shrinkB": 4})


def _place_labels(ax: Any, points: list[tuple[float, float, str]], fig: Any, fontsize: float = 8.5) -> None:
    """Annotate points; each label takes the candidate offset that overlaps the labels and markers
    already placed the least (first such offset wins ties)."""
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    placed = _label_boxes(ax, points)
    x_lo, x_hi = ax.get_window_extent(renderer).x0, ax.get_window_extent(renderer).x1
    for x, y, text in sorted(points, key=lambda p: (p[0], -p[1])):
        px = ax.transData.transform((x, y))[0]
        sign = -1 if (px - x_lo) / max(1.0, x_hi - x_lo) > 0.65 else 1
        offsets = [(sign * 10, 0)] + [(s * 10, dy) for dy in (9, -9, 18, -18, 27, -27) for s in (sign, -sign)]
        best, best_cost = None, math.inf
        for dx, dy in offsets:
            ann = _annotate(ax, x, y, text, dx, dy, fontsize)
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer)  # the text alone, not its leader line
            cost = _overlap(box, placed) + (0 if dx * sign > 0 else 1.0)  # slight preference for the outer side
            if cost < best_cost:
                if best is not None:
                    best.remove()
                best, best_cost = ann, cost
            else:
                ann.remove()
            if cost <= 1.0:
                break
        best.update_positions(renderer)
        box = Text.get_window_extent(best, renderer)
        placed.append((box.x0, box.y0, box.x1, box.y1))


# ----------------------------------------------------------------------------- the figure


@dataclass
class _Layout:
    """What every panel of one figure shares."""

    reports: Sequence[Report]
    rows: list[_Row]
    mc_metric: str
    unit: float
    unit_name: str
    ref: _Row | None  # the one original (size-ratio axes, reference lines), None with several
    log_x: bool

    def mc(self, row: _Row) -> float | None:
        return row.acc if self.mc_metric == "acc" else row.acc_norm

    def value(self, panel: str) -> Callable[[_Row], float | None]:
        if panel == "ppl":
            return lambda r: r.ppl
        return lambda r: None if self.mc(r) is None else 100 * self.mc(r)


_STYLES = (
    ("original", lambda r: r.original, {"marker": "*", "s": 200, "color": "black", "zorder": 4}),
    ("candidate (PyTorch)", lambda r: not r.original and not r.onnx, {"marker": "o", "s": 55, "color": "tab:blue", "zorder": 3}),
    ("candidate (ONNX)", lambda r: r.onnx, {"marker": "s", "s": 50, "color": "tab:orange", "zorder": 3}),
)


def _ppl_panel(ax: Any, layout: _Layout) -> None:
    ppl = layout.reports[0].original.ppl
    detail = f"\ncontext {ppl.context}, stride {ppl.stride}, {ppl.tokens} scored tokens" if ppl is not None else ""
    ax.set_title(f"Perplexity (lower is better){detail}", fontsize=10)
    ax.set_ylabel("perplexity (held-out text)")
    ref = layout.ref
    if ref is not None and ref.ppl:
        base = ref.ppl
        sec = ax.secondary_yaxis("right", functions=(lambda p: 100 * (p / base - 1), lambda d: base * (1 + d / 100)))
        sec.set_ylabel("Δ perplexity vs original (%)")
        ax.axhline(base, color="0.5", lw=0.8, ls="--", zorder=1)


def _mc_panel(ax: Any, layout: _Layout) -> None:
    ns = {r.mc_n for r in layout.rows if r.mc_n}
    shots = _shots(layout.reports)
    n_text = f"\n{ns.pop()} items, {shots} log-likelihood" if len(ns) == 1 else f"\n{shots} log-likelihood"
    ax.set_title(f"Multiple-choice {layout.mc_metric} (higher is better){n_text}", fontsize=10)
    ax.set_ylabel(f"{layout.mc_metric} (%)")
    if layout.ref is not None and layout.mc(layout.ref) is not None:
        ax.axhline(100 * layout.mc(layout.ref), color="0.5", lw=0.8, ls="--", zorder=1)


def _draw_panel(ax: Any, panel: str, layout: _Layout) -> None:
    value = layout.value(panel)
    for label, pick, style in _STYLES:
        chosen = [r for r in layout.rows if pick(r) and value(r) is not None]
        if chosen:
            ax.scatter([r.disk_bytes / layout.unit for r in chosen], [value(r) for r in chosen], label=label, **style)
    if layout.log_x:
        ax.set_xscale("log")
    ax.margins(x=0.2, y=0.25)
    ax.grid(True, alpha=0.3)
    ax.set_xlabel(f"weight bytes on disk ({layout.unit_name})")
    (_ppl_panel if panel == "ppl" else _mc_panel)(ax, layout)
    if layout.ref is not None:
        base_size = layout.ref.disk_bytes / layout.unit
        top = ax.secondary_xaxis("top", functions=(lambda s: s / base_size, lambda q: q * base_size))
        top.set_xlabel("size ratio vs original (disk)", fontsize=9)


def _key_panel(key: Any, layout: _Layout) -> None:
    """The numbered points' names, sizes, perplexities and accuracies beside the panels."""
    key.axis("off")
    lines = []
    for i, r in enumerate(layout.rows):
        ppl = "-" if r.ppl is None else f"{r.ppl:.3f}"
        acc = "-" if layout.mc(r) is None else f"{100 * layout.mc(r):.1f}%"
        lines.append(f"{i + 1:>2}. {r.label}\n    {r.disk_bytes / layout.unit:.1f} {layout.unit_name}, ppl {ppl}, "
                     f"{layout.mc_metric} {acc}")
    key.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=8, family="monospace", transform=key.transAxes)
    key.set_title("points", fontsize=10, loc="left")


def _layout(reports: Sequence[Report], mc_metric: str) -> tuple[_Layout, list[str]]:
    """The rows to draw and their scales; the panels that have data."""
    rows, unplaced = _collect_rows(reports)
    mc_of = (lambda r: r.acc) if mc_metric == "acc" else (lambda r: r.acc_norm)
    panels = [p for p, present in (("ppl", any(r.ppl is not None for r in rows)),
                                   ("mc", any(mc_of(r) is not None for r in rows))) if present]
    if not rows or not panels:
        raise MissingPlotData(f"no row has weight_bytes_disk together with ppl.ppl or mc.{mc_metric}")
    if unplaced:
        log.warning("accuracy_vs_size: rows without weight_bytes_disk not drawn: %s", ", ".join(unplaced))
    unit, unit_name = (_GIB, "GiB") if max(r.disk_bytes for r in rows) >= 10 * _GIB else (_MIB, "MiB")
    originals = [r for r in rows if r.original]
    ref = originals[0] if len(originals) == 1 and originals[0].disk_bytes > 0 else None
    sizes = [r.disk_bytes / unit for r in rows]
    log_x = max(sizes) / max(min(sizes), 1e-12) > 30
    return _Layout(reports, rows, mc_metric, unit, unit_name, ref, log_x), panels


def _legend(fig: Any, axes: list[Any]) -> None:
    """One legend for every panel, below them (loc="best" is slow and data dependent)."""
    legend: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=len(legend), fontsize=9, frameon=False)


def accuracy_vs_size(reports: Sequence[Report], *, mc_metric: str = "acc", max_direct_labels: int = 6) -> Any:
    """Perplexity and multiple-choice accuracy against weight bytes on disk, one point per row.

    Args:
        reports: One or more runs. Each candidate is one point; the original model is drawn once
            however many reports carry it (originals with equal disk size, perplexity and accuracy,
            up to float noise, are one model).
        mc_metric: ``"acc"`` or ``"acc_norm"`` for the accuracy panel.
        max_direct_labels: Up to this many points carry their name; more points carry a number
            and a key beside the panels lists name, size, perplexity and accuracy.

    Returns:
        The figure (:func:`dsq.eval.plot_common.png_bytes` makes it a PNG).

    Raises:
        MissingPlotData: no row has a disk size together with a perplexity or an accuracy.
    """
    if mc_metric not in ("acc", "acc_norm"):
        raise ValueError(f"mc_metric must be 'acc' or 'acc_norm', got {mc_metric!r}")
    if not reports:
        raise MissingPlotData("no report given")
    layout, panels = _layout(reports, mc_metric)
    tagged = len(layout.rows) > max_direct_labels
    key_width = 0.4 + 0.068 * max(34, *(len(r.label) + 5 for r in layout.rows)) if tagged else 0.0
    fig = new_figure(6.4 * len(panels) + key_width, 5.4)
    grid = fig.add_gridspec(1, len(panels) + (1 if tagged else 0),
                            width_ratios=[6.4] * len(panels) + ([key_width] if tagged else []))
    axes = [fig.add_subplot(grid[0, i]) for i in range(len(panels))]
    model = Path(str(reports[0].meta.get("model") or "")).name
    fig.suptitle(f"Accuracy vs weight size{f' — {model}' if model else ''}", fontsize=13, fontweight="bold")
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel, layout)
    _legend(fig, axes)
    if tagged:
        _key_panel(fig.add_subplot(grid[0, len(panels)]), layout)
    if layout.ref is None:
        originals = sum(r.original for r in layout.rows)
        fig.text(0.01, 0.01, f"{originals} different originals: no size-ratio axis", fontsize=8, color="0.4")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    tags = {id(r): (str(i + 1) if tagged else r.label) for i, r in enumerate(layout.rows)}
    for ax, panel in zip(axes, panels):
        value = layout.value(panel)
        points = [(r.disk_bytes / layout.unit, value(r), tags[id(r)]) for r in layout.rows if value(r) is not None]
        _place_labels(ax, points, fig, fontsize=8 if tagged else 8.5)
    return fig
