"""Plots: routed experts as (MoE layers x experts) heatmaps: weight SQNR per expert, calibration tokens per expert.

Data read from a quantization record (``QuantizationReport.to_dict()``): per-expert SQNR from
``modules[*].expert_sqnr_db``; token counts from ``calibration.expert_routed_tokens`` and
``calibration.experts_without_routed_tokens``.
"""
from __future__ import annotations

from typing import Any

from dsq.eval.facts import finite_number
from dsq.eval.plot_common import MissingPlotData, expert_axes, expert_grid, new_figure, scheme_text, short

_ANNOTATED_CELLS = 400  # up to this many cells, each carries its value


def _colorbar(fig: Any, image: Any, ax: Any, cols: int, label: str) -> Any:
    bar = fig.colorbar(image, ax=ax, pad=0.02, fraction=0.05 if cols <= 32 else 0.025)
    bar.set_label(label)
    return bar


# ----------------------------------------------------------------------------- per-expert SQNR


def _sqnr_rows(quant_record: dict) -> dict[str, list[float | None]]:
    """Experts module name -> per-expert SQNR (``None`` where not finite)."""
    method = quant_record.get("method", "?")
    modules = [m for m in quant_record.get("modules") or [] if isinstance(m, dict)]
    rows = {str(m.get("name")): [finite_number(v) for v in m["expert_sqnr_db"]]
            for m in modules if isinstance(m.get("expert_sqnr_db"), list) and m["expert_sqnr_db"]}
    if not rows:
        where = "no modules list" if not modules else "no fused-experts module with expert_sqnr_db"
        raise MissingPlotData(f"the {method} quantization record has no per-expert SQNR ({where})")
    return rows


def _ring(x: float, y: float) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.48, y - 0.48), 0.96, 0.96, fill=False, edgecolor="red", linewidth=2.0)


def _sqnr_cells(ax: Any, grid: Any, low: float, high: float, worst_cols: list[int | None]) -> None:
    """Ring each layer's worst expert; write every value when the cells are large enough.

    ``low`` and ``high`` are the colour scale's ends (white text below their middle)."""
    import numpy as np

    for i, j in enumerate(worst_cols):
        if j is not None:
            ax.add_patch(_ring(j, i))
    n_rows, cols = grid.shape
    if n_rows * cols > _ANNOTATED_CELLS:
        return
    digits = 2 if high - low < 3 else 1
    mid = low + 0.5 * (high - low)
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.{digits}f}", ha="center", va="center", fontsize=8 if cols <= 16 else 6.5,
                    color="white" if value < mid else "black", fontweight="bold" if worst_cols[i] == j else "normal")


def expert_sqnr(quant_record: dict) -> Any:
    """Heatmap of weight SQNR per routed expert (MoE layers x experts); the worst expert of each layer ringed.

    Args:
        quant_record: A quantization record whose ``modules[*]`` fused-experts entries carry
            ``expert_sqnr_db`` (per expert, the lower of its gate_up and down SQNRs).

    Returns:
        The figure.

    Raises:
        MissingPlotData: no module has per-expert SQNRs (dense model, experts kept, or a method
            that does not measure them).
    """
    import numpy as np

    method = quant_record.get("method", "?")
    names, grid = expert_grid(_sqnr_rows(quant_record))
    finite = grid[np.isfinite(grid)]
    if finite.size == 0:
        raise MissingPlotData(f"the {method} quantization record has per-expert SQNRs but none is finite")
    n_rows, cols = grid.shape
    fig = new_figure(min(16.0, max(9.0, 3.5 + 0.6 * cols)), min(11.0, max(3.9, 2.7 + 0.42 * n_rows)))
    ax = fig.subplots()
    low, high = float(finite.min()), float(finite.max())
    if high - low < 0.5:  # a flat field still gets a readable colour scale
        low, high = low - 0.25, high + 0.25
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=low, vmax=high, interpolation="nearest")
    _colorbar(fig, image, ax, cols, "weight SQNR (dB, higher is better)")
    worst_cols = [int(np.nanargmin(row)) if np.isfinite(row).any() else None for row in grid]
    _sqnr_cells(ax, grid, low, high, worst_cols)
    expert_axes(ax, names, n_rows, cols)
    i, j = np.unravel_index(int(np.nanargmin(grid)), grid.shape)
    ax.set_title(f"Weight SQNR per routed expert — {method} {scheme_text(quant_record)}\n"
                 "each cell: the lower of the expert's gate_up and down SQNR; worst expert of each layer outlined red\n"
                 f"lowest: {short(names[i])} expert {j} ({grid[i, j]:.2f} dB)", fontsize=10)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- per-expert tokens


def _routed_counts(quant_record: dict) -> tuple[dict, dict[str, list]]:
    """The record's calibration section and its ``expert_routed_tokens``."""
    calibration = quant_record.get("calibration")
    method = quant_record.get("method", "?")
    if not isinstance(calibration, dict):
        raise MissingPlotData(f"the {method} quantization record has no calibration section (calibration-free method)")
    counts = calibration.get("expert_routed_tokens")
    if not isinstance(counts, dict) or not counts:
        raise MissingPlotData(f"the {method} calibration record has no expert_routed_tokens (no routed experts)")
    return calibration, counts


def _zero_cells(names: list[str], grid: Any, calibration: dict) -> Any:
    """``(modules, experts)`` mask of the experts with no routed token (counted 0, or listed as such)."""
    zero = grid == 0
    starved = calibration.get("experts_without_routed_tokens") or {}
    for i, name in enumerate(names):
        for e in starved.get(name, []):
            if 0 <= e < grid.shape[1]:
                zero[i, e] = True
    return zero


def _token_cells(ax: Any, grid: Any, zero: Any, annotate: bool) -> None:
    """Write every count (0-token cells marked ✗) when the cells are large enough, else ring the 0-token cells."""
    import numpy as np

    cols = grid.shape[1]
    finite = grid[np.isfinite(grid)]
    if annotate:
        high = 0.6 * float(finite.max()) if finite.size else 0.0
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, "0 ✗" if zero[i, j] else f"{int(value)}", ha="center", va="center",
                        fontsize=8 if cols <= 16 else 6.5,
                        color="white" if zero[i, j] or value < high else "black",
                        fontweight="bold" if zero[i, j] else "normal")
    elif zero.any():
        ii, jj = np.nonzero(zero)
        ax.scatter(jj, ii, s=90, facecolors="none", edgecolors="red", linewidths=1.5)


def _tokens_title(quant_record: dict, calibration: dict, counts: dict[str, list], names: list[str], n_zero: int,
                  annotate: bool) -> str:
    method = quant_record.get("method", "?")
    tokens = calibration.get("tokens")
    total = f"{tokens} calibration tokens" if tokens is not None else "calibration tokens"
    routed = [sum(counts[n]) for n in names]
    if tokens and all(r == routed[0] for r in routed) and routed[0] % tokens == 0:
        total += f", each routed to {routed[0] // tokens} experts"
    mark = "red, ✗" if annotate else "red, ringed"
    return f"Routed calibration tokens per expert — {method}\n{total}; {n_zero} expert(s) with 0 routed tokens ({mark})"


def expert_tokens(quant_record: dict) -> Any:
    """Heatmap of routed calibration tokens per expert (MoE layers x experts); 0-token experts in red.

    Args:
        quant_record: A quantization record with ``calibration.expert_routed_tokens``
            (``{experts module name: [count per expert]}``) and optionally
            ``calibration.experts_without_routed_tokens`` (``{name: [expert index]}``).

    Returns:
        The figure.

    Raises:
        MissingPlotData: no calibration, or no routed-expert counts (dense model).
    """
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator

    calibration, counts = _routed_counts(quant_record)
    names, grid = expert_grid(counts)
    zero = _zero_cells(names, grid, calibration)
    rows, cols = grid.shape
    annotate = rows * cols <= _ANNOTATED_CELLS
    fig = new_figure(min(16.0, max(8.0, 3.5 + 0.55 * cols)), min(11.0, max(3.6, 2.2 + 0.42 * rows)))
    ax = fig.subplots()
    finite = grid[np.isfinite(grid)]
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(1.0, float(finite.max())),
                      interpolation="nearest")
    ax.imshow(np.where(zero, 1.0, np.nan), aspect="auto", cmap=ListedColormap(["red"]), vmin=0, vmax=1,
              interpolation="nearest")
    bar = _colorbar(fig, image, ax, cols, "routed calibration tokens (count)")
    bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _token_cells(ax, grid, zero, annotate)
    expert_axes(ax, names, rows, cols)
    ax.set_title(_tokens_title(quant_record, calibration, counts, names, int(zero.sum()), annotate), fontsize=11)
    fig.tight_layout()
    return fig
