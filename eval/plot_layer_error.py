"""Plots: per-module quantization error (weight SQNR, relative error) and calibration loss (GPTQ, AWQ, autoround).

Data read from a quantization record (``QuantizationReport.to_dict()``, as ``manifest.json["quantization"]``
holds it, or a row's ``extra.quantization``, which lacks the ``modules`` list): per-module weight SQNR from
``modules[*].sqnr_db`` (every weight method: RTN, GPTQ, AWQ, W8A8); calibration losses from
``calibration.modules[name]`` (``gptq_loss`` for GPTQ; ``awq_loss`` and ``awq_loss_without_scaling`` for AWQ;
``loss_after`` and ``loss_before`` per decoder block for autoround's learned rounding).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from dsq.eval.facts import finite_number, layer_of
from dsq.eval.plot_common import MissingPlotData, new_figure, scheme_text, short


@dataclass(frozen=True)
class _ErrorMetric:
    key: str
    label: str  # the value axis
    higher_is_better: bool
    what: str  # in the title
    reference_key: str | None = None  # a second value per entry, drawn as a tick
    reference_label: str | None = None
    recorded_by: str | None = None  # the method whose calibration records it (None: not a calibration loss)


# Searched in this order; the first with a finite value in the record is plotted.
_ERROR_METRICS = (
    _ErrorMetric("sqnr_db", "weight SQNR  10·log10(|W|² / |W − Q(W)|²)  (dB, higher is better)", True, "weight SQNR"),
    _ErrorMetric("relative_error", "relative weight error", False, "quantization error"),
    _ErrorMetric("gptq_loss", "GPTQ proxy loss  Σ err² / [H⁻¹]ᵢᵢ / 2  (a.u., lower is better)", False,
                 "GPTQ calibration loss", recorded_by="GPTQ"),
    _ErrorMetric("awq_loss", "AWQ block-output MSE with the chosen scales (lower is better)", False,
                 "AWQ calibration loss", "awq_loss_without_scaling", "without AWQ scaling", recorded_by="AWQ"),
    # SignRound (Cheng et al. 2023): each block's output MSE against full precision, learned vs nearest rounding
    _ErrorMetric("loss_after", "learned rounding block-output MSE (lower is better)", False,
                 "learned rounding loss", "loss_before", "round to nearest", recorded_by="autoround"),
)

_COMPONENTS = {  # component -> colour; a mapping balancing several components takes the first listed here
    "routed experts": "tab:orange",
    "shared experts": "tab:purple",
    "dense MLP": "tab:green",
    "attention": "tab:blue",
    "decoder block": "tab:olive",
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
    if re.search(r"(^|\.)layers\.\d+$", target):  # a whole block (autoround's learned-rounding loss)
        return "decoder block"
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


LOSS_KEYS = tuple(m.key for m in _ERROR_METRICS if m.recorded_by is not None)
WEIGHT_ERROR_KEYS = ("sqnr_db", "relative_error")  # what the layer_error plot shows; losses get their own plot


def _entry(name: str, fields: dict, metric: _ErrorMetric, value: float) -> _ErrorEntry:
    """One bar: an AWQ mapping is labelled with the modules it balances and coloured by the first of their components."""
    balances = fields.get("awq_balances")
    if isinstance(balances, list) and balances:
        prefix = re.sub(r"(layers\.\d+)\..*$", r"\1", name)  # the decoder layer
        targets = [re.sub(r"^(self_attn|mlp)\.", "", str(b)) for b in balances]
        label = f"{short(name)} → {', '.join(targets)}"
        kinds = {_component(f"{prefix}.{b}") for b in balances}
        component = next(k for k in _COMPONENTS if k in kinds or k == "other")
    else:
        label, component = short(name), _component(name)
    ref = finite_number(fields.get(metric.reference_key)) if metric.reference_key else None
    return _ErrorEntry(name, label, value, ref, component, layer_of(name))


def _missing(record: dict, entries: list[tuple[str, dict]], metrics: list[_ErrorMetric],
             keys: tuple[str, ...] | None) -> MissingPlotData:
    """Why none of ``metrics`` is in the record."""
    method = record.get("method", "?")
    known = ", ".join(m.key for m in metrics)
    if keys is not None and set(keys) <= set(LOSS_KEYS):
        names = [str(m.recorded_by) for m in metrics]
        recording = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        return MissingPlotData(f"the {method} quantization record holds no calibration loss ({known}): "
                               f"only {recording} record one")
    if not entries:
        return MissingPlotData(f"the {method} quantization record holds no per-module entries (calibration is "
                               f"{'null' if record.get('calibration') is None else 'without modules'})")
    return MissingPlotData(f"the {method} quantization record holds no per-module error metric ({known}); "
                           f"its per-module entries have only: {sorted({k for _, f in entries for k in f})}")


def _error_entries(record: dict, keys: tuple[str, ...] | None = None) -> tuple[_ErrorMetric, list[_ErrorEntry]]:
    """The first metric of :data:`_ERROR_METRICS` (among ``keys``) that the record holds, and its entries."""
    entries = _module_entries(record)
    metrics = [m for m in _ERROR_METRICS if keys is None or m.key in keys]
    for metric in metrics:
        found: list[_ErrorEntry] = []
        seen: set[str] = set()
        for name, fields in entries:
            value = finite_number(fields.get(metric.key))
            if value is None or name in seen:
                continue
            seen.add(name)
            found.append(_entry(name, fields, metric, value))
        if found:
            return metric, found
    raise _missing(record, entries, metrics, keys)


def _worst(entries: list[_ErrorEntry], metric: _ErrorMetric, k: int) -> list[_ErrorEntry]:
    return sorted(entries, key=lambda e: e.value, reverse=not metric.higher_is_better)[:k]


def _use_log(values: list[float], metric: _ErrorMetric) -> bool:
    positive = [v for v in values if v > 0]
    return (not metric.higher_is_better and len(positive) == len(values)
            and max(positive) / min(positive) > 100)


def layer_error(quant_record: dict, *, max_bars: int = 120, highlight: int = 5,
                metrics: tuple[str, ...] | None = None) -> Any:
    """Per-module quantization error as bars, the worst modules highlighted and labelled.

    The metric is the first of weight SQNR (``sqnr_db``, every weight method), relative error,
    GPTQ loss, AWQ loss and learned-rounding block loss that the record holds (``metrics`` restricts the choice).

    Up to ``max_bars`` modules: one horizontal bar per module in model order, coloured by
    component (attention, dense MLP, shared experts, routed experts, whole decoder block). More modules (a full
    MoE model): one bar per decoder layer and component, the worst module of each group.

    Args:
        quant_record: A quantization record (``manifest.json["quantization"]`` or
            ``report.json`` ``candidates[*].extra["quantization"]``).
        max_bars: Most per-module bars before grouping by layer.
        highlight: How many of the worst modules are highlighted.
        metrics: Metric keys to choose from (``None``: all).

    Returns:
        The figure.

    Raises:
        MissingPlotData: the record holds none of the metrics (bitsandbytes records hold none;
            RTN, GPTQ, AWQ, autoround and W8A8 records hold ``sqnr_db``; GPTQ also ``gptq_loss``, AWQ
            ``awq_loss``, autoround ``loss_after``).
    """
    metric, entries = _error_entries(quant_record, metrics)
    method = quant_record.get("method", "?")
    scheme = scheme_text(quant_record)
    title = f"Per-module {metric.what} — {method} {scheme}".rstrip()
    if len(entries) <= max_bars:
        return _per_module_bars(metric, entries, title, highlight)
    return _per_layer_bars(metric, entries, title, highlight)


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
    fig = new_figure(max(10.0, 7.5 + 0.075 * longest), max(4.0, 1.9 + 0.21 * n))
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
    fig = new_figure(min(18.0, max(10.0, 0.22 * len(slots) * len(components))), 6.0)
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


def calibration_loss(quant_record: dict, *, max_bars: int = 120, highlight: int = 5) -> Any:
    """Per-module loss of the calibrated method as bars: GPTQ proxy loss, AWQ block-output MSE (tick: without
    scaling), or autoround's block-output MSE with the learned rounding (tick: with round-to-nearest).

    Args:
        quant_record: A GPTQ, AWQ or autoround quantization record (``calibration.modules``).
        max_bars: Most per-module bars before grouping by layer.
        highlight: How many of the worst modules are highlighted.

    Returns:
        The figure.

    Raises:
        MissingPlotData: the record holds no ``gptq_loss`` / ``awq_loss`` / ``loss_after`` (RTN, W8A8, bitsandbytes).
    """
    return layer_error(quant_record, max_bars=max_bars, highlight=highlight, metrics=LOSS_KEYS)
