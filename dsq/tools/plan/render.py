"""The plan as Markdown: parameters, decoder layers, weights on disk, peak memory, calibration compute."""
from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .results import LayerPlan, Plan

GiB = 1 << 30


def format_params(n: int) -> str:
    """``1.23 B``, ``4.56 M``: a parameter count for reading."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def format_bytes(n: int) -> str:
    """``1.50 GiB``, ``12.00 KiB``: a byte count for reading."""
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], align: str) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _layer_groups(layers: tuple[LayerPlan, ...]) -> list[tuple[list[int], LayerPlan]]:
    """Layers of the same kind and size (adjacent or not: DeepSeek-V4 alternates two attention kinds):
    ``(indices, plan of the first)``, in the order of their first layer."""
    groups: dict[tuple, tuple[list[int], LayerPlan]] = {}
    for p in layers:
        key = (p.moe, p.parameters, p.quantized_bytes, p.peak_bytes, p.compress_rate, p.indexer, p.attention_type)
        groups.setdefault(key, ([], p))[0].append(p.index)
    return list(groups.values())


def _span(indices: list[int]) -> str:
    """``3``, ``3-60``, ``2, 4, ..., 42`` (a constant step), or a list of runs."""
    if len(indices) == 1:
        return str(indices[0])
    steps = {b - a for a, b in pairwise(indices)}
    if steps == {1}:
        return f"{indices[0]}-{indices[-1]}"
    if len(steps) == 1 and len(indices) > 2:
        return f"{indices[0]}, {indices[1]}, ..., {indices[-1]}"
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _attention_kind(p: LayerPlan) -> str:
    """``compressed_sparse_attention (KV 1:4, indexer)``: transformers' layer type and what it adds to the keys."""
    parts = ([f"KV 1:{p.compress_rate}"] if p.compress_rate else []) + (["indexer"] if p.indexer else [])
    details = f"({', '.join(parts)})" if parts else ""
    return " ".join(x for x in (p.attention_type, details) if x) or "-"


def _parameter_lines(plan: Plan) -> list[str]:
    total = plan.parameters.total
    rows = [(name, format_params(n), f"{100 * n / total:.1f}%") for name, n in plan.parameters.by_category]
    rows.append(("**total**", f"**{format_params(total)}**", "100%"))
    if plan.source.unused is not None:
        rows.append(("not used by the model (not quantized)", format_params(plan.source.unused.parameters), "-"))
    lines = ["## Parameters", "", *_table(("category", "parameters", "share"), rows, "lrr")]
    extra = []
    if plan.parameters.buffers:
        tables = plan.parameters.integer_buffers
        what = "router score bias" + (f"; {tables:,} of them in integer hash-routing tables" if tables else "")
        extra.append(f"plus {plan.parameters.buffers:,} elements of saved buffers ({what})")
    if plan.parameters.tied_embeddings:
        extra.append("lm_head is tied to the input embedding (stored once)")
    if plan.source.header_parameters is not None:
        expected = total + plan.parameters.buffers
        verdict = "matches the model" if plan.source.header_parameters == expected and not plan.source.missing else "DIFFERS from the model"
        extra.append(f"safetensors headers: {plan.source.header_parameters:,} elements of the tensors the model uses ({verdict})")
    return lines + ([""] + [f"- {e}" for e in extra] if extra else [])


def _layer_lines(plan: Plan) -> list[str]:
    sparse = any(p.compress_rate or p.indexer for p in plan.layers)
    rows = []
    for indices, p in _layer_groups(plan.layers):
        extra = (_attention_kind(p),) if sparse else ()
        rows.append((_span(indices), "MoE" if p.moe else "dense", *extra, format_params(p.parameters),
                     format_bytes(p.working_bytes), format_bytes(p.quantized_bytes), format_bytes(p.statistics_bytes),
                     format_bytes(p.temporary_bytes)))
    header = ("layers", "MLP", *(("attention",) if sparse else ()), "parameters each", "working bytes each",
              "quantized each", "statistics each", "temporaries each")
    return ["## Decoder layers", "", *_table(header, rows, "ll" + ("l" if sparse else "") + "rrrrr")]


def _bytes_lines(plan: Plan) -> list[str]:
    src = plan.source
    origin = "safetensors headers" if src.from_headers else "computed from config.json"
    rows = [(f"source ({origin})", src.storage, format_bytes(src.tensor_bytes), "1.00")]
    for s in plan.schemes:
        mark = "" if s.exact else " (approx.)"
        rows.append((s.label + mark, s.description, format_bytes(s.tensor_bytes), f"{s.tensor_bytes / max(1, src.tensor_bytes):.2f}"))
    lines = ["## Weights on disk", "", *_table(("weights", "stored as", "bytes", "vs source"), rows, "llrr")]
    if src.parts:
        lines += ["", "source by format (the model's tensors; scales included):", ""]
        lines += [f"- {p.label}: {format_params(p.parameters)} parameters, {format_bytes(p.bytes)}, "
                  f"{p.bits_per_weight:.2f} bits per weight" for p in src.parts]
    return lines


def _memory_lines(plan: Plan) -> list[str]:
    lines = ["## Peak memory (estimate)", "",
             *_table(("where", "peak"), [(m.label, format_bytes(m.total)) for m in (plan.in_memory, plan.streaming, plan.accelerator)], "lr")]
    for m in (plan.in_memory, plan.streaming, plan.accelerator):
        lines += ["", f"{m.label}:", ""]
        lines += [f"- {what}: {format_bytes(b)}" for what, b in m.parts if b]
    return lines


def _serving_lines(plan: Plan) -> list[str]:
    serving = plan.serving
    if serving is None:
        return []
    contexts = [c for c, _, _ in serving.rows[0].contexts]
    header = ("weights", "KV cache", "KV bytes per token", "weight bytes",
              *(f"total at {c // 1024}k tokens" for c in contexts))
    rows = [(r.label, r.kv_cache, f"{r.kv_bytes_per_token:,}", format_bytes(r.weight_bytes),
             *(format_bytes(total) for _, _, total in r.contexts)) for r in serving.rows]
    return ["## Serving memory, batch 1 (weights + KV cache)", "", *_table(header, rows, "llrr" + "r" * len(contexts)), "",
            f"- per token the KV cache holds {serving.layout} elements: one byte each for an int8 / FP8 KV cache "
            "(as a serving engine stores it; scales not counted), the recipe dtype otherwise",
            "- one sequence; a batch of B sequences holds B caches"]


def _time_lines(plan: Plan) -> list[str]:
    t = plan.time
    rows = [(what, f"{f:.3g}") for what, f in t.flops]
    rows.append(("**total**", f"**{t.total_flops:.3g}**"))
    lines = ["## Calibration compute (estimate)", "", *_table(("part", "FLOPs"), rows, "lr"), ""]
    lines += [f"- at {tflops:g} TFLOPS ({label}): {_duration(t.seconds(tflops))}" for label, tflops in t.throughputs]
    return lines


def render_markdown(plan: Plan) -> str:
    """The plan as Markdown: parameters, decoder layers, weights on disk, peak memory, calibration compute.

    Args:
        plan: a plan.

    Returns:
        The Markdown text.
    """
    head = [
        f"# Plan: {Path(plan.checkpoint).name} ({plan.model_type}, {plan.architecture})",
        "",
        f"- checkpoint: {plan.checkpoint}" + (" (config.json only)" if plan.config_only else ""),
        f"- {plan.recipe}",
        "- no tensor data was read; parameter and byte counts are exact, memory and time are estimates",
        "",
    ]
    sections = [_parameter_lines(plan), _layer_lines(plan), _bytes_lines(plan), _memory_lines(plan), _serving_lines(plan),
                _time_lines(plan)]
    body = [line for section in sections for line in (*section, "")]
    notes = ["## Notes", "", *[f"- {n}" for n in plan.notes], ""] if plan.notes else []
    return "\n".join(head + body + notes)
