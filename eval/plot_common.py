"""What every plot shares: a pyplot-free figure, PNG bytes, module-name labels, expert heatmap axes.

matplotlib (and numpy, with it) is imported only when a figure is drawn, so this module imports without it.
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from typing import Any

from dsq.eval.facts import layer_of

DPI = 120


class MissingPlotData(ValueError):
    """The data a plot needs is not in the given report or record; the message says what is missing."""


@dataclass(frozen=True)
class Plot:
    """One drawn plot.

    Attributes:
        name: Its name, also its file's stem (``plots/<name>.png``).
        png: The PNG image.
    """

    name: str
    png: bytes

    @property
    def file_name(self) -> str:
        return f"{self.name}.png"


def new_figure(width: float, height: float) -> Any:
    """A pyplot-free figure (inches) with an Agg canvas attached: no global state, no display needed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("dsq.eval.plots needs matplotlib: pip install matplotlib") from exc
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Any) -> bytes:
    """The figure as a PNG image on a white background."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


def short(name: str) -> str:
    """``model.layers.3.mlp.experts.0.down_proj`` -> ``L3 mlp.experts.0.down_proj``."""
    match = re.match(r"^(?:.*\.)?layers\.(\d+)\.(.*)$", name)
    return f"L{match.group(1)} {match.group(2)}" if match else name


def scheme_text(record: dict) -> str:
    """The record's scheme, without the method name when the scheme already starts with it (``w8a8 ...``)."""
    method, scheme = str(record.get("method", "")), str(record.get("scheme") or "")
    return scheme[len(method):].lstrip() if method and scheme.startswith(method + " ") else scheme


def expert_grid(rows: dict[str, list]) -> tuple[list[str], Any]:
    """Experts modules in layer order and a ``(modules, experts)`` grid of their values (None -> NaN)."""
    import numpy as np

    names = sorted(rows, key=lambda n: (layer_of(n) is None, layer_of(n) or 0, n))
    grid = np.full((len(names), max(len(rows[n]) for n in names)), np.nan)
    for i, name in enumerate(names):
        grid[i, : len(rows[name])] = [np.nan if v is None else v for v in rows[name]]
    return names, grid


def expert_axes(ax: Any, names: list[str], rows: int, cols: int) -> None:
    """Ticks and labels of a layers x experts heatmap (at most ~32 expert and ~40 layer ticks)."""
    xstep = max(1, math.ceil(cols / 32))
    ax.set_xticks(range(0, cols, xstep))
    ax.set_xlabel("expert index")
    ystep = max(1, math.ceil(rows / 40))
    ax.set_yticks(range(0, rows, ystep))
    ax.set_yticklabels([short(n) for n in names][::ystep], fontsize=8)
    ax.set_ylabel("MoE layer (experts module)")
