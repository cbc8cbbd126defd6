"""PNG plots of a dsq run: accuracy versus size, per-module weight SQNR, calibration losses,
per-expert SQNR, per-expert tokens.

Every plot is drawn on a :class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot, no
global state, no display needed). matplotlib is imported only when a plot is drawn, so this
module imports without it.

Data read:

* :func:`accuracy_vs_size`: ``report.json`` dicts (:func:`dsq.eval.report.report_to_dict`):
  ``original`` and ``candidates[*]`` ``name``, ``weight_bytes_disk``, ``ppl.ppl``, ``mc.acc``,
  ``mc.acc_norm``, ``mc.n``, ``extra.onnx`` (ONNX rows get their own marker),
  ``deltas.disk_size_ratio``; ``perplexity_settings`` and ``meta.model`` for the titles.
* :func:`layer_error`, :func:`calibration_loss`, :func:`expert_sqnr` and :func:`expert_tokens`:
  a quantization record, i.e. ``QuantizationReport.to_dict()`` as in
  ``manifest.json["quantization"]`` (or the ``candidates[*].extra["quantization"]`` summary of
  ``report.json``, which lacks the ``modules`` list). Per-module weight SQNR is read from
  ``modules[*].sqnr_db`` (every weight method: RTN, GPTQ, AWQ, W8A8), per-expert SQNR from
  ``modules[*].expert_sqnr_db``; calibration losses from ``calibration.modules[name]``
  (``gptq_loss`` for GPTQ; ``awq_loss`` and ``awq_loss_without_scaling`` for AWQ); token counts
  from ``calibration.expert_routed_tokens`` and ``calibration.experts_without_routed_tokens``.

A plot whose data is absent raises :class:`MissingPlotData` with the reason;
:func:`write_plots` turns that into a logged skip listed in the result's ``skipped``.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
_GIB = 1024 * _MIB
_DPI = 120
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class MissingPlotData(ValueError):
    """The data a plot needs is not in the given report or record; the message says what is missing."""


class WrittenPlots(list):
    """The PNG paths :func:`write_plots` wrote (a ``list[Path]``), plus ``skipped``: plot name -> reason."""

    def __init__(self, paths: list[Path] | None = None, skipped: dict[str, str] | None = None) -> None:
        super().__init__(paths or [])
        self.skipped: dict[str, str] = dict(skipped or {})


# ----------------------------------------------------------------------------- shared helpers


def _new_figure(width: float, height: float) -> Any:
    """A pyplot-free figure with an Agg canvas attached."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("dsq.eval.plots needs matplotlib: pip install matplotlib") from exc
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _png_path(out: Path | str, default_name: str) -> Path:
    """``out`` itself, or ``out/default_name`` when ``out`` is a directory (or has no suffix)."""
    out = Path(out)
    if out.is_dir() or not out.suffix:
        out = out / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _save(fig: Any, out: Path) -> Path:
    fig.savefig(out, dpi=_DPI, facecolor="white")
    return out


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else ``None`` (JSON null, NaN, strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _expert_grid(rows: dict[str, list]) -> tuple[list[str], Any]:
    """Experts modules in layer order and a (modules x experts) grid of their values (None -> NaN)."""
    import numpy as np

    names = sorted(rows, key=lambda n: (_layer_of(n) is None, _layer_of(n) or 0, n))
    grid = np.full((len(names), max(len(rows[n]) for n in names)), np.nan)
    for i, name in enumerate(names):
        grid[i, : len(rows[name])] = [np.nan if v is None else v for v in rows[name]]
    return names, grid


def _expert_axes(ax, names: list[str], rows: int, cols: int) -> None:
    """Ticks and labels of a layers x experts heatmap (at most ~32 expert and ~40 layer ticks)."""
    xstep = max(1, math.ceil(cols / 32))
    ax.set_xticks(range(0, cols, xstep))
    ax.set_xlabel("expert index")
    ystep = max(1, math.ceil(rows / 40))
    ax.set_yticks(range(0, rows, ystep))
    ax.set_yticklabels([_short(n) for n in names][::ystep], fontsize=8)
    ax.set_ylabel("MoE layer (experts module)")


def _short(name: str) -> str:
    """``model.layers.3.mlp.experts.0.down_proj`` -> ``L3 mlp.experts.0.down_proj``."""
    match = re.match(r"^(?:.*\.)?layers\.(\d+)\.(.*)$", name)
    return f"L{match.group(1)} {match.group(2)}" if match else name


# ----------------------------------------------------------------------------- accuracy vs size


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
    ratio: float | None
    source: str = ""  # the run the row comes from (its output directory's name), to tell equal names apart


def _metric(row: dict, section: str, key: str) -> float | None:
    part = row.get(section)
    return _finite(part.get(key)) if isinstance(part, dict) else None


def _same_original(a: _Row, b: _Row) -> bool:
    """Originals of several reports are one model when size and metrics agree (up to float noise)."""
    def close(x: float | None, y: float | None) -> bool:
        return x is None or y is None or math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-9)

    return a.disk_bytes == b.disk_bytes and close(a.ppl, b.ppl) and close(a.acc, b.acc)


def _collect_rows(reports: list[dict]) -> tuple[list[_Row], list[str]]:
    """Plot rows (originals deduplicated by their numbers) and the names of rows without a disk size."""
    rows: list[_Row] = []
    unplaced: list[str] = []
    for index, report in enumerate(reports):
        output = ((report.get("meta") or {}).get("recipe") or {}).get("output")
        source = Path(str(output)).name if output else f"report {index + 1}"
        original = report.get("original")
        if not isinstance(original, dict):
            raise MissingPlotData(f"report {index} has no 'original' row")
        orig_bytes = original.get("weight_bytes_disk")
        if orig_bytes is None:
            unplaced.append(str(original.get("name", "original")))
        else:
            row = _Row(str(original.get("name") or "original"), True, False, int(orig_bytes),
                       _metric(original, "ppl", "ppl"), _metric(original, "mc", "acc"),
                       _metric(original, "mc", "acc_norm"), _mc_n(original), 1.0)
            if not any(r.original and _same_original(r, row) for r in rows):
                rows.append(row)
        for cand in report.get("candidates") or []:
            disk = cand.get("weight_bytes_disk")
            if disk is None:
                unplaced.append(str(cand.get("name")))
                continue
            ratio = _finite((cand.get("deltas") or {}).get("disk_size_ratio"))
            if ratio is None and orig_bytes:
                ratio = disk / orig_bytes
            rows.append(_Row(
                str(cand.get("name")), False, isinstance((cand.get("extra") or {}).get("onnx"), dict), int(disk),
                _metric(cand, "ppl", "ppl"), _metric(cand, "mc", "acc"), _metric(cand, "mc", "acc_norm"), _mc_n(cand),
                ratio, source,
            ))
    _disambiguate(rows)
    return rows, unplaced


def _shots(reports: list[dict]) -> str:
    """``zero-shot`` / ``k-shot`` from the rows' ``mc.num_fewshot`` (absent in older reports: zero-shot)."""
    ks = set()
    for report in reports:
        for row in [report.get("original"), *(report.get("candidates") or [])]:
            mc = row.get("mc") if isinstance(row, dict) else None
            if isinstance(mc, dict):
                ks.add(int(mc.get("num_fewshot") or 0))
    return "/".join("zero-shot" if k == 0 else f"{k}-shot" for k in sorted(ks)) or "zero-shot"


def _mc_n(row: dict) -> int | None:
    mc = row.get("mc")
    return mc.get("n") if isinstance(mc, dict) else None


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


def _place_labels(ax: Any, points: list[tuple[float, float, str]], fig: Any, fontsize: float = 8.5) -> None:
    """Annotate points; each label takes the candidate offset that overlaps the labels and markers
    already placed the least (first such offset wins ties)."""
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    transform = ax.transData
    markers = []
    for x, y, _ in points:  # a small box around every marker
        px, py = transform.transform((x, y))
        markers.append((px - 9, py - 9, px + 9, py + 9))
    placed: list[tuple[float, float, float, float]] = list(markers)
    x_lo, x_hi = ax.get_window_extent(renderer).x0, ax.get_window_extent(renderer).x1

    def overlap(box: Any) -> float:
        total = 0.0
        for x0, y0, x1, y1 in placed:
            w = min(box.x1, x1) - max(box.x0, x0)
            h = min(box.y1, y1) - max(box.y0, y0)
            if w > 0 and h > 0:
                total += w * h
        return total

    def annotate(x: float, y: float, text: str, dx: float, dy: float) -> Any:
        return ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                           ha="left" if dx > 0 else "right", va="center",
                           arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 1, "shrinkB": 4})

    for x, y, text in sorted(points, key=lambda p: (p[0], -p[1])):
        px = transform.transform((x, y))[0]
        sign = -1 if (px - x_lo) / max(1.0, x_hi - x_lo) > 0.65 else 1
        offsets = [(sign * 10, 0)] + [(s * 10, dy) for dy in (9, -9, 18, -18, 27, -27) for s in (sign, -sign)]
        best, best_cost = None, math.inf
        for dx, dy in offsets:
            ann = annotate(x, y, text, dx, dy)
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer)  # the text alone, not its leader line
            cost = overlap(box) + (0 if dx * sign > 0 else 1.0)  # slight preference for the outer side
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


def accuracy_vs_size(reports: list[dict], out: Path, *, mc_metric: str = "acc", max_direct_labels: int = 6) -> Path:
    """Perplexity and multiple-choice accuracy against weight bytes on disk, one point per row.

    Args:
        reports: ``report.json`` dicts (one or more runs). Each candidate is one point; the
            original model is drawn once however many reports carry it (originals with equal
            disk size, perplexity and accuracy, up to float noise, are one model).
        out: The PNG path (or a directory: ``accuracy_vs_size.png`` inside it).
        mc_metric: ``"acc"`` or ``"acc_norm"`` for the accuracy panel.
        max_direct_labels: Up to this many points carry their name; more points carry a number
            and a key beside the panels lists name, size, perplexity and accuracy.

    Returns:
        The PNG path.

    Raises:
        MissingPlotData: no row has a disk size together with a perplexity or an accuracy.
    """
    if mc_metric not in ("acc", "acc_norm"):
        raise ValueError(f"mc_metric must be 'acc' or 'acc_norm', got {mc_metric!r}")
    if not reports:
        raise MissingPlotData("no report given")
    rows, unplaced = _collect_rows(reports)
    mc_of = (lambda r: r.acc) if mc_metric == "acc" else (lambda r: r.acc_norm)
    has_ppl = any(r.ppl is not None for r in rows)
    has_mc = any(mc_of(r) is not None for r in rows)
    if not rows or not (has_ppl or has_mc):
        raise MissingPlotData(f"no row has weight_bytes_disk together with ppl.ppl or mc.{mc_metric}")
    if unplaced:
        log.warning("accuracy_vs_size: rows without weight_bytes_disk not drawn: %s", ", ".join(unplaced))
    out = _png_path(out, "accuracy_vs_size.png")

    unit, unit_name = (_GIB, "GiB") if max(r.disk_bytes for r in rows) >= 10 * _GIB else (_MIB, "MiB")
    originals = [r for r in rows if r.original]
    ref = originals[0] if len(originals) == 1 and originals[0].disk_bytes > 0 else None
    panels = [p for p, present in (("ppl", has_ppl), ("mc", has_mc)) if present]
    tagged = len(rows) > max_direct_labels
    key_width = 0.4 + 0.068 * max(34, *(len(r.label) + 5 for r in rows)) if tagged else 0.0
    fig = _new_figure(6.4 * len(panels) + key_width, 5.4)
    grid = fig.add_gridspec(1, len(panels) + (1 if tagged else 0),
                            width_ratios=[6.4] * len(panels) + ([key_width] if tagged else []))
    axes = [fig.add_subplot(grid[0, i]) for i in range(len(panels))]

    model = Path(str((reports[0].get("meta") or {}).get("model") or "")).name
    fig.suptitle(f"Accuracy vs weight size{f' — {model}' if model else ''}", fontsize=13, fontweight="bold")
    values = {"ppl": lambda r: r.ppl, "mc": lambda r: None if mc_of(r) is None else 100 * mc_of(r)}
    sizes = [r.disk_bytes / unit for r in rows]
    log_x = max(sizes) / max(min(sizes), 1e-12) > 30
    styles = (
        ("original", lambda r: r.original, {"marker": "*", "s": 200, "color": "black", "zorder": 4}),
        ("candidate (PyTorch)", lambda r: not r.original and not r.onnx, {"marker": "o", "s": 55, "color": "tab:blue", "zorder": 3}),
        ("candidate (ONNX)", lambda r: r.onnx, {"marker": "s", "s": 50, "color": "tab:orange", "zorder": 3}),
    )
    for ax, panel in zip(axes, panels):
        value = values[panel]
        for label, pick, style in styles:
            chosen = [r for r in rows if pick(r) and value(r) is not None]
            if chosen:
                ax.scatter([r.disk_bytes / unit for r in chosen], [value(r) for r in chosen], label=label, **style)
        if log_x:
            ax.set_xscale("log")
        ax.margins(x=0.2, y=0.25)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel(f"weight bytes on disk ({unit_name})")
        if panel == "ppl":
            settings = reports[0].get("perplexity_settings") or {}
            detail = (f"\ncontext {settings.get('context')}, stride {settings.get('stride')}, {settings.get('tokens')} scored tokens"
                      if settings else "")
            ax.set_title(f"Perplexity (lower is better){detail}", fontsize=10)
            ax.set_ylabel("perplexity (held-out text)")
            if ref is not None and ref.ppl:
                base = ref.ppl
                sec = ax.secondary_yaxis("right", functions=(lambda p: 100 * (p / base - 1), lambda d: base * (1 + d / 100)))
                sec.set_ylabel("Δ perplexity vs original (%)")
                ax.axhline(base, color="0.5", lw=0.8, ls="--", zorder=1)
        else:
            ns = {r.mc_n for r in rows if r.mc_n}
            shots = _shots(reports)
            n_text = f"\n{ns.pop()} items, {shots} log-likelihood" if len(ns) == 1 else f"\n{shots} log-likelihood"
            ax.set_title(f"Multiple-choice {mc_metric} (higher is better){n_text}", fontsize=10)
            ax.set_ylabel(f"{mc_metric} (%)")
            if ref is not None and mc_of(ref) is not None:
                ax.axhline(100 * mc_of(ref), color="0.5", lw=0.8, ls="--", zorder=1)
        if ref is not None:
            base_size = ref.disk_bytes / unit
            top = ax.secondary_xaxis("top", functions=(lambda s: s / base_size, lambda q: q * base_size))
            top.set_xlabel("size ratio vs original (disk)", fontsize=9)
    legend: dict[str, Any] = {}
    for ax in axes:  # one legend for both panels, below them (loc="best" is slow and data dependent)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=len(legend), fontsize=9, frameon=False)
    tags = {id(r): (str(i + 1) if tagged else r.label) for i, r in enumerate(rows)}
    if tagged:
        key = fig.add_subplot(grid[0, len(panels)])
        key.axis("off")
        lines = []
        for i, r in enumerate(rows):
            ppl = "-" if r.ppl is None else f"{r.ppl:.3f}"
            acc = "-" if mc_of(r) is None else f"{100 * mc_of(r):.1f}%"
            lines.append(f"{i + 1:>2}. {r.label}\n    {r.disk_bytes / unit:.1f} {unit_name}, ppl {ppl}, {mc_metric} {acc}")
        key.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=8, family="monospace", transform=key.transAxes)
        key.set_title("points", fontsize=10, loc="left")
    if ref is None:
        fig.text(0.01, 0.01, f"{len(originals)} different originals: no size-ratio axis", fontsize=8, color="0.4")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    for ax, panel in zip(axes, panels):
        points = [(r.disk_bytes / unit, values[panel](r), tags[id(r)]) for r in rows if values[panel](r) is not None]
        _place_labels(ax, points, fig, fontsize=8 if tagged else 8.5)
    return _save(fig, out)


# ----------------------------------------------------------------------------- per-module error


@dataclass(frozen=True)
class _ErrorMetric:
    key: str
    label: str
    higher_is_better: bool
    reference_key: str | None = None
    reference_label: str | None = None


# Searched in this order; the first with a finite value in the record is plotted.
_ERROR_METRICS = (
    _ErrorMetric("sqnr_db", "weight SQNR  10·log10(|W|² / |W − Q(W)|²)  (dB, higher is better)", True),
    _ErrorMetric("relative_error", "relative weight error", False),
    _ErrorMetric("gptq_loss", "GPTQ proxy loss  Σ err² / [H⁻¹]ᵢᵢ / 2  (a.u., lower is better)", False),
    _ErrorMetric("awq_loss", "AWQ block-output MSE with the chosen scales (lower is better)", False,
                 "awq_loss_without_scaling", "without AWQ scaling"),
)

_COMPONENTS = {  # component -> colour; a mapping balancing several components takes the first listed here
    "routed experts": "tab:orange",
    "shared experts": "tab:purple",
    "dense MLP": "tab:green",
    "attention": "tab:blue",
    "other": "tab:gray",
}


def _component(target: str) -> str:
    if "self_attn" in target or ".attn." in target:
        return "attention"
    if "shared_experts" in target:
        return "shared experts"
    if re.search(r"\.experts(\.|$)", target):
        return "routed experts"
    if ".mlp." in target:
        return "dense MLP"
    return "other"


@dataclass
class _ErrorEntry:
    name: str  # as recorded
    label: str  # shown
    value: float
    reference: float | None
    component: str
    layer: int | None


def _module_entries(record: dict) -> list[tuple[str, dict]]:
    """(name, fields) of every per-module entry: ``calibration.modules`` then ``modules[*]``."""
    entries: list[tuple[str, dict]] = []
    calibration = record.get("calibration")
    if isinstance(calibration, dict) and isinstance(calibration.get("modules"), dict):
        entries += [(str(n), f) for n, f in calibration["modules"].items() if isinstance(f, dict)]
    if isinstance(record.get("modules"), list):
        entries += [(str(m.get("name")), m) for m in record["modules"] if isinstance(m, dict)]
    return entries


_LOSS_KEYS = ("gptq_loss", "awq_loss")
_WEIGHT_ERROR_KEYS = ("sqnr_db", "relative_error")  # what write_plots' layer_error shows; losses get their own plot


def _error_entries(record: dict, keys: tuple[str, ...] | None = None) -> tuple[_ErrorMetric, list[_ErrorEntry]]:
    entries = _module_entries(record)
    metrics = [m for m in _ERROR_METRICS if keys is None or m.key in keys]
    for metric in metrics:
        found: list[_ErrorEntry] = []
        seen: set[str] = set()
        for name, fields in entries:
            value = _finite(fields.get(metric.key))
            if value is None or name in seen:
                continue
            seen.add(name)
            balances = fields.get("awq_balances")
            prefix = re.sub(r"(layers\.\d+)\..*$", r"\1", name)  # the decoder layer
            if isinstance(balances, list) and balances:
                short = [re.sub(r"^(self_attn|mlp)\.", "", str(b)) for b in balances]
                label = f"{_short(name)} → {', '.join(short)}"
                kinds = {_component(f"{prefix}.{b}") for b in balances}
                component = next(k for k in _COMPONENTS if k in kinds or k == "other")
            else:
                label, component = _short(name), _component(name)
            ref = _finite(fields.get(metric.reference_key)) if metric.reference_key else None
            found.append(_ErrorEntry(name, label, value, ref, component, _layer_of(name)))
        if found:
            return metric, found
    method = record.get("method", "?")
    known = ", ".join(m.key for m in metrics)
    if keys is not None and set(keys) <= set(_LOSS_KEYS):
        raise MissingPlotData(f"the {method} quantization record holds no calibration loss ({known}): "
                              "only GPTQ and AWQ record one")
    if not entries:
        raise MissingPlotData(f"the {method} quantization record holds no per-module entries (calibration is "
                              f"{'null' if record.get('calibration') is None else 'without modules'})")
    raise MissingPlotData(f"the {method} quantization record holds no per-module error metric ({known}); "
                          f"its per-module entries have only: {sorted({k for _, f in entries for k in f})}")


def _worst(entries: list[_ErrorEntry], metric: _ErrorMetric, k: int) -> list[_ErrorEntry]:
    return sorted(entries, key=lambda e: e.value, reverse=not metric.higher_is_better)[:k]


def _scheme_text(record: dict) -> str:
    """The record's scheme, without the method name when the scheme already starts with it (``w8a8 ...``)."""
    method, scheme = str(record.get("method", "")), str(record.get("scheme") or "")
    return scheme[len(method):].lstrip() if method and scheme.startswith(method + " ") else scheme


def _use_log(values: list[float], metric: _ErrorMetric) -> bool:
    positive = [v for v in values if v > 0]
    return (not metric.higher_is_better and len(positive) == len(values)
            and max(positive) / min(positive) > 100)


def layer_error(quant_record: dict, out: Path, *, max_bars: int = 120, highlight: int = 5,
                metrics: tuple[str, ...] | None = None) -> Path:
    """Per-module quantization error as bars, the worst modules highlighted and labelled.

    The metric is the first of weight SQNR (``sqnr_db``, every weight method), relative error,
    GPTQ loss and AWQ loss that the record holds (``metrics`` restricts the choice).

    Up to ``max_bars`` modules: one horizontal bar per module in model order, coloured by
    component (attention, dense MLP, shared experts, routed experts). More modules (a full
    MoE model): one bar per decoder layer and component, the worst module of each group.

    Args:
        quant_record: A quantization record (``manifest.json["quantization"]`` or
            ``report.json`` ``candidates[*].extra["quantization"]``).
        out: The PNG path (or a directory: ``layer_error.png`` inside it).
        max_bars: Most per-module bars before grouping by layer.
        highlight: How many of the worst modules are highlighted.
        metrics: Metric keys to choose from (``None``: all).

    Returns:
        The PNG path.

    Raises:
        MissingPlotData: the record holds none of the metrics (bitsandbytes records hold none;
            RTN, GPTQ, AWQ and W8A8 records hold ``sqnr_db``; GPTQ also ``gptq_loss``, AWQ ``awq_loss``).
    """
    metric, entries = _error_entries(quant_record, metrics)
    out = _png_path(out, "layer_error.png")
    method = quant_record.get("method", "?")
    scheme = _scheme_text(quant_record)
    what = {"sqnr_db": "weight SQNR", "gptq_loss": "GPTQ calibration loss", "awq_loss": "AWQ calibration loss"}.get(
        metric.key, "quantization error")
    title = f"Per-module {what} — {method} {scheme}".rstrip()
    if len(entries) <= max_bars:
        fig = _per_module_bars(metric, entries, title, highlight)
    else:
        fig = _per_layer_bars(metric, entries, title, highlight)
    return _save(fig, out)


def _zoom_db(ax: Any, values: list[float], metric: _ErrorMetric, axis: str) -> None:
    """SQNR axes start just below the lowest value (0 dB is no natural baseline), so small differences show."""
    if metric.key != "sqnr_db" or not values:
        return
    low, high = min(values), max(values)
    pad = max(1.0, 0.25 * (high - low))
    start = max(0.0, math.floor(low - pad)) if low > 0 else math.floor(low - pad)
    end = high + max(0.6, 0.12 * (high - start))
    (ax.set_xlim if axis == "x" else ax.set_ylim)(start, end)


def _per_module_bars(metric: _ErrorMetric, entries: list[_ErrorEntry], title: str, highlight: int) -> Any:
    from matplotlib.patches import Patch

    n = len(entries)
    longest = max(len(e.label) for e in entries)
    fig = _new_figure(max(10.0, 7.5 + 0.075 * longest), max(4.0, 1.9 + 0.21 * n))
    ax = fig.subplots()
    worst = {id(e) for e in _worst(entries, metric, highlight)}
    ys = list(range(n))
    values = [e.value for e in entries]
    bars = ax.barh(ys, values, color=[_COMPONENTS[e.component] for e in entries], height=0.72,
                   edgecolor=["red" if id(e) in worst else "none" for e in entries],
                   linewidth=[1.8 if id(e) in worst else 0 for e in entries])
    if _use_log(values + [e.reference for e in entries if e.reference], metric):
        ax.set_xscale("log")
    refs = [(e.reference, y) for e, y in zip(entries, ys) if e.reference is not None]
    handles = [Patch(color=c, label=k) for k, c in _COMPONENTS.items() if any(e.component == k for e in entries)]
    if refs:
        ax.scatter([r for r, _ in refs], [y for _, y in refs], marker="|", s=120, color="black", zorder=3)
        from matplotlib.lines import Line2D
        handles.append(Line2D([], [], marker="|", ls="none", color="black", markersize=11, label=metric.reference_label))
    handles.append(Patch(facecolor="white", edgecolor="red", linewidth=1.8, label=f"{len(worst)} worst"))
    ax.set_yticks(ys)
    ax.set_yticklabels([e.label for e in entries], fontsize=8)
    for tick, e in zip(ax.get_yticklabels(), entries):
        if id(e) in worst:
            tick.set_color("red")
            tick.set_fontweight("bold")
    for bar, e in zip(bars, entries):
        if id(e) in worst:
            ax.annotate(f"{e.value:.3g}", (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=8, color="red", fontweight="bold")
    previous = None
    for y, e in zip(ys, entries):  # thin separators between decoder layers
        if previous is not None and e.layer != previous:
            ax.axhline(y - 0.5, color="0.75", lw=0.6)
        previous = e.layer
    ax.set_ylim(n - 0.5, -0.5)
    ax.margins(x=0.12)
    _zoom_db(ax, values, metric, "x")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_xlabel(metric.label)
    ax.set_title(f"{title}\n{n} modules in model order ({'higher' if metric.higher_is_better else 'lower'} is better)",
                 fontsize=11)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.9)
    fig.tight_layout()
    return fig


def _per_layer_bars(metric: _ErrorMetric, entries: list[_ErrorEntry], title: str, highlight: int) -> Any:
    from matplotlib.patches import Patch

    pick = min if metric.higher_is_better else max
    components = [c for c in _COMPONENTS if any(e.component == c for e in entries)]
    layers = sorted({e.layer for e in entries if e.layer is not None})
    has_other = any(e.layer is None for e in entries)
    slots = layers + ([None] if has_other else [])
    groups: dict[tuple, list[_ErrorEntry]] = {}
    for e in entries:
        groups.setdefault((e.layer, e.component), []).append(e)
    fig = _new_figure(min(18.0, max(10.0, 0.22 * len(slots) * len(components))), 6.0)
    ax = fig.subplots()
    width = 0.8 / len(components)
    worst = _worst(entries, metric, highlight)
    worst_groups = {(e.layer, e.component) for e in worst}
    all_values = []
    for j, comp in enumerate(components):
        xs, vs, edges = [], [], []
        for i, layer in enumerate(slots):
            group = groups.get((layer, comp))
            if not group:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            vs.append(pick(e.value for e in group))
            edges.append("red" if (layer, comp) in worst_groups else "none")
        all_values += vs
        ax.bar(xs, vs, width=width, color=_COMPONENTS[comp], edgecolor=edges, linewidth=1.5, label=comp)
    if _use_log(all_values, metric):
        ax.set_yscale("log")
    _zoom_db(ax, all_values, metric, "y")
    step = max(1, math.ceil(len(slots) / 40))
    ax.set_xticks(range(0, len(slots), step))
    ax.set_xticklabels(["head" if s is None else str(s) for s in slots][::step], fontsize=8)
    ax.set_xlim(-0.6, len(slots) - 0.4)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(f"{metric.label}\n({'min' if metric.higher_is_better else 'max'} over the group's modules)", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(f"{title}\n{len(entries)} modules grouped by layer and component; worst {len(worst)} outlined red",
                 fontsize=11)
    lines = "\n".join(f"{i + 1}. {e.label}: {e.value:.3g}" for i, e in enumerate(worst))
    ax.text(1.01, 1.0, f"worst modules\n{lines}", transform=ax.transAxes, va="top", ha="left", fontsize=9,
            color="darkred", family="monospace")
    handles = [Patch(color=_COMPONENTS[c], label=c) for c in components]
    ax.legend(handles=handles, fontsize=8, loc="lower left", bbox_to_anchor=(1.01, 0.0), framealpha=0.9)  # beside the bars
    fig.tight_layout()
    return fig


def calibration_loss(quant_record: dict, out: Path, *, max_bars: int = 120, highlight: int = 5) -> Path:
    """Per-module loss of the calibrated method (GPTQ proxy loss, AWQ block-output MSE) as bars.

    Args:
        quant_record: A GPTQ or AWQ quantization record (``calibration.modules``).
        out: The PNG path (or a directory: ``calibration_loss.png`` inside it).
        max_bars: Most per-module bars before grouping by layer.
        highlight: How many of the worst modules are highlighted.

    Returns:
        The PNG path.

    Raises:
        MissingPlotData: the record holds no ``gptq_loss`` / ``awq_loss`` (RTN, W8A8, bitsandbytes).
    """
    return layer_error(quant_record, _png_path(out, "calibration_loss.png"), max_bars=max_bars, highlight=highlight,
                       metrics=_LOSS_KEYS)


# ----------------------------------------------------------------------------- per-expert SQNR


def expert_sqnr(quant_record: dict, out: Path) -> Path:
    """Heatmap of weight SQNR per routed expert (MoE layers x experts); the worst expert of each layer ringed.

    Args:
        quant_record: A quantization record whose ``modules[*]`` fused-experts entries carry
            ``expert_sqnr_db`` (per expert, the lower of its gate_up and down SQNRs).
        out: The PNG path (or a directory: ``expert_sqnr.png`` inside it).

    Returns:
        The PNG path.

    Raises:
        MissingPlotData: no module has per-expert SQNRs (dense model, experts kept, or a method
            that does not measure them).
    """
    import numpy as np

    method = quant_record.get("method", "?")
    modules = [m for m in quant_record.get("modules") or [] if isinstance(m, dict)]
    rows = {str(m.get("name")): [_finite(v) for v in m["expert_sqnr_db"]]
            for m in modules if isinstance(m.get("expert_sqnr_db"), list) and m["expert_sqnr_db"]}
    if not rows:
        where = "no modules list" if not modules else "no fused-experts module with expert_sqnr_db"
        raise MissingPlotData(f"the {method} quantization record has no per-expert SQNR ({where})")
    out = _png_path(out, "expert_sqnr.png")
    names, grid = _expert_grid(rows)
    finite = grid[np.isfinite(grid)]
    if finite.size == 0:
        raise MissingPlotData(f"the {method} quantization record has per-expert SQNRs but none is finite")
    n_rows, cols = grid.shape
    annotate = n_rows * cols <= 400
    fig = _new_figure(min(16.0, max(9.0, 3.5 + 0.6 * cols)), min(11.0, max(3.9, 2.7 + 0.42 * n_rows)))
    ax = fig.subplots()
    low, high = float(finite.min()), float(finite.max())
    digits = 2 if high - low < 3 else 1
    if high - low < 0.5:  # a flat field still gets a readable colour scale
        low, high = low - 0.25, high + 0.25
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=low, vmax=high, interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, pad=0.02, fraction=0.05 if cols <= 32 else 0.025)
    bar.set_label("weight SQNR (dB, higher is better)")
    worst_cols = [int(np.nanargmin(row)) if np.isfinite(row).any() else None for row in grid]
    for i, j in enumerate(worst_cols):
        if j is not None:
            ax.add_patch(_ring(j, i))
    if annotate:
        mid = low + 0.5 * (high - low)
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.{digits}f}", ha="center", va="center", fontsize=8 if cols <= 16 else 6.5,
                        color="white" if value < mid else "black",
                        fontweight="bold" if worst_cols[i] == j else "normal")
    _expert_axes(ax, names, n_rows, cols)
    i, j = np.unravel_index(int(np.nanargmin(grid)), grid.shape)
    scheme = _scheme_text(quant_record)
    ax.set_title(f"Weight SQNR per routed expert — {method} {scheme}\n"
                 "each cell: the lower of the expert's gate_up and down SQNR; worst expert of each layer outlined red\n"
                 f"lowest: {_short(names[i])} expert {j} ({grid[i, j]:.2f} dB)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def _ring(x: float, y: float) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.48, y - 0.48), 0.96, 0.96, fill=False, edgecolor="red", linewidth=2.0)


# ----------------------------------------------------------------------------- per-expert tokens


def expert_tokens(quant_record: dict, out: Path) -> Path:
    """Heatmap of routed calibration tokens per expert (MoE layers x experts); 0-token experts in red.

    Args:
        quant_record: A quantization record with ``calibration.expert_routed_tokens``
            (``{experts module name: [count per expert]}``) and optionally
            ``calibration.experts_without_routed_tokens`` (``{name: [expert index]}``).
        out: The PNG path (or a directory: ``expert_tokens.png`` inside it).

    Returns:
        The PNG path.

    Raises:
        MissingPlotData: no calibration, or no routed-expert counts (dense model).
    """
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator

    calibration = quant_record.get("calibration")
    method = quant_record.get("method", "?")
    if not isinstance(calibration, dict):
        raise MissingPlotData(f"the {method} quantization record has no calibration section (calibration-free method)")
    counts = calibration.get("expert_routed_tokens")
    if not isinstance(counts, dict) or not counts:
        raise MissingPlotData(f"the {method} calibration record has no expert_routed_tokens (no routed experts)")
    out = _png_path(out, "expert_tokens.png")
    names, grid = _expert_grid(counts)
    zero = grid == 0
    starved = calibration.get("experts_without_routed_tokens") or {}
    for i, name in enumerate(names):
        for e in starved.get(name, []):
            if 0 <= e < grid.shape[1]:
                zero[i, e] = True
    n_zero = int(zero.sum())

    rows, cols = grid.shape
    annotate = rows * cols <= 400
    fig = _new_figure(min(16.0, max(8.0, 3.5 + 0.55 * cols)), min(11.0, max(3.6, 2.2 + 0.42 * rows)))
    ax = fig.subplots()
    finite = grid[np.isfinite(grid)]
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(1.0, float(finite.max())),
                      interpolation="nearest")
    ax.imshow(np.where(zero, 1.0, np.nan), aspect="auto", cmap=ListedColormap(["red"]), vmin=0, vmax=1,
              interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, pad=0.02, fraction=0.05 if cols <= 32 else 0.025)
    bar.set_label("routed calibration tokens (count)")
    bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if annotate:
        high = 0.6 * float(finite.max()) if finite.size else 0.0
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, "0 ✗" if zero[i, j] else f"{int(value)}", ha="center", va="center",
                        fontsize=8 if cols <= 16 else 6.5,
                        color="white" if zero[i, j] or value < high else "black",
                        fontweight="bold" if zero[i, j] else "normal")
    elif n_zero:  # cells too small to read: ring the 0-token cells
        ii, jj = np.nonzero(zero)
        ax.scatter(jj, ii, s=90, facecolors="none", edgecolors="red", linewidths=1.5)
    _expert_axes(ax, names, rows, cols)
    tokens = calibration.get("tokens")
    total = f"{tokens} calibration tokens" if tokens is not None else "calibration tokens"
    routed = [sum(counts[n]) for n in names]
    if tokens and all(r == routed[0] for r in routed) and routed[0] % tokens == 0:
        total += f", each routed to {routed[0] // tokens} experts"
    mark = "red, ✗" if annotate else "red, ringed"
    ax.set_title(f"Routed calibration tokens per expert — {method}\n{total}; "
                 f"{n_zero} expert(s) with 0 routed tokens ({mark})", fontsize=11)
    fig.tight_layout()
    return _save(fig, out)


# ----------------------------------------------------------------------------- artifact


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _quant_record(report: dict | None, manifest: dict | None) -> tuple[dict | None, str]:
    """The artifact's quantization record and where it came from (``manifest`` has the ``modules`` list)."""
    if manifest and isinstance(manifest.get("quantization"), dict):
        return manifest["quantization"], "manifest.json quantization"
    for cand in (report or {}).get("candidates") or []:
        record = (cand.get("extra") or {}).get("quantization")
        if isinstance(record, dict):
            return record, f"report.json candidate {cand.get('name')!r} extra.quantization"
    return None, ""


def write_plots(artifact_dir: Path, quant_record: dict | None = None) -> WrittenPlots:
    """Write the plots that apply to an artifact into ``artifact_dir/plots/``.

    Reads ``report.json`` (accuracy vs size) and ``manifest.json`` (``quantization``: per-module
    weight SQNR, calibration loss, per-expert SQNR, per-expert tokens; the report's
    ``extra.quantization`` when the manifest has none).
    A plot whose data is absent is skipped: the reason is logged (warning) and kept in the
    result's ``skipped``, and a stale PNG of that name is removed.

    Args:
        artifact_dir: A dsq artifact (or evaluation output) directory.
        quant_record: the quantization record to plot (default: read from the directory's files).

    Returns:
        The written PNG paths (a list), with ``.skipped``: plot name -> reason.
    """
    artifact_dir = Path(artifact_dir)
    out_dir = artifact_dir / "plots"
    report = _read_json(artifact_dir / "report.json")
    manifest = _read_json(artifact_dir / "manifest.json")
    record, source = (quant_record, "the run's quantization record") if quant_record else _quant_record(report, manifest)
    no_record = ("no quantization record (manifest.json has no 'quantization', report.json no extra.quantization)"
                 if manifest is not None or report is not None else f"neither report.json nor manifest.json in {artifact_dir}")
    jobs: list[tuple[str, Callable[[Path], Path] | None, str]] = [
        ("accuracy_vs_size", (lambda p: accuracy_vs_size([report], p)) if report else None, "no report.json"),
        ("layer_error", (lambda p: layer_error(record, p, metrics=_WEIGHT_ERROR_KEYS)) if record else None, no_record),
        ("calibration_loss", (lambda p: calibration_loss(record, p)) if record else None, no_record),
        ("expert_sqnr", (lambda p: expert_sqnr(record, p)) if record else None, no_record),
        ("expert_tokens", (lambda p: expert_tokens(record, p)) if record else None, no_record),
    ]
    result = WrittenPlots()
    for name, draw, absent in jobs:
        path = out_dir / f"{name}.png"
        reason = absent
        if draw is not None:
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                result.append(draw(path))
                log.info("plot %s written: %s", name, path)
                continue
            except MissingPlotData as exc:
                reason = str(exc)
        if source and name != "accuracy_vs_size":
            reason = f"{reason} [from {source}]"
        result.skipped[name] = reason
        path.unlink(missing_ok=True)
        log.warning("plot %s skipped: %s", name, reason)
    return result


def write_plots_if_installed(directory: Path, quant_record: dict | None = None) -> WrittenPlots | None:
    """:func:`write_plots`, or a logged warning and ``None`` when matplotlib is not installed."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        log.warning("matplotlib is not installed: no plots written (pip install 'dsq[plots]')")
        return None
    return write_plots(directory, quant_record)


__all__ = [
    "MissingPlotData", "WrittenPlots", "accuracy_vs_size", "calibration_loss", "expert_sqnr", "expert_tokens", "layer_error",
    "write_plots", "write_plots_if_installed",
]
