"""Peak memory of quantizing: host memory of the in-memory and streaming paths, and accelerator memory.

Each estimate is a sum of named parts. The runtime part is measured (a dsq run on CPU before any
weight: Python, torch, transformers, dsq, the tokenizer and the evaluator), the others are byte
counts of what dsq holds at the peak. ``tests/tools/test_plan_measured.py`` checks the totals
against the peak RSS of real runs.
"""
from __future__ import annotations

from dataclasses import dataclass

from dsq.quantize.cost import Calibration, Rounding

from .artifact import ArtifactBytes, Layout
from .facts import ModelFacts, tensor_bytes
from .flops import routed_flops
from .results import LayerPlan, MemoryEstimate
from .source import LoadedSource
from .statistics import (
    CalibrationRun,
    activation_bytes,
    hidden_copies,
    statistics_bytes,
    temporary_bytes,
    workspace_bytes,
)

GiB = 1 << 30

RUNTIME_BYTES = 520 << 20
"""Resident memory of a dsq run before its first weight is read: Python with torch, transformers and dsq
imported, the tokenizer and the evaluator loaded. Measured on CPU (torch 2.13, transformers 5.25):
490-560 MiB at the start of quantization, in memory and streamed (``benchmarks/plan_vs_measured.py``)."""

ACCELERATOR_BASELINE_BYTES = int(0.5 * GiB)
"""Accelerator memory taken by the runtime itself (CUDA context, allocator reserve). Not measured: the
estimates were checked on CPU-only machines."""


@dataclass(frozen=True)
class Quantization:
    """What the recipe does to the model, as the estimates need it.

    Attributes:
        layout: the artifact layout.
        rounding: how the method rounds fused experts (None: no quantization).
        calibration: what the method calibrates (None: calibration-free).
        run: the calibration data (None: calibration-free).
        dtype_name: the recipe dtype.
        dtype_bytes: its bytes per element.
        whole_run: the whole calibration set when ``run`` is one process's share of it (None: ``run`` is all).
    """

    layout: Layout
    rounding: Rounding | None
    calibration: Calibration | None
    run: CalibrationRun | None
    dtype_name: str
    dtype_bytes: int
    whole_run: CalibrationRun | None = None

    def statistics(self, facts: ModelFacts, index: int | None) -> int:
        """Calibration statistics held for decoder layer ``index`` (None: the head stage)."""
        return statistics_bytes(facts, index, self.calibration, self.run, self.dtype_bytes)

    def temporaries(self, facts: ModelFacts, index: int | None) -> int:
        """Rounding temporaries of the largest tensor of decoder layer ``index`` (None: the head stage)."""
        return temporary_bytes(facts, index, self.layout if self.rounding else None, self.rounding, self.dtype_bytes)


def layer_plans(facts: ModelFacts, q: Quantization, quantized: ArtifactBytes) -> tuple[LayerPlan, ...]:
    """Every decoder layer: parameters, working and quantized bytes, statistics and temporaries.

    Args:
        facts: the model's facts.
        q: the recipe's quantization.
        quantized: the artifact in the recipe's layout.

    Returns:
        The layer plans.
    """
    plans = []
    for layer in facts.layers:
        mine = [t for t in facts.tensors if t.layer == layer.index]
        plans.append(LayerPlan(
            index=layer.index, moe=layer.moe, parameters=sum(t.numel for t in mine if t.parameter),
            working_bytes=tensor_bytes(mine, q.dtype_bytes), quantized_bytes=quantized.per_layer.get(layer.index, 0),
            statistics_bytes=q.statistics(facts, layer.index), temporary_bytes=q.temporaries(facts, layer.index),
            forward_flops_per_token=routed_flops(facts, layer, q.run.seq_len if q.run else 1),
            compress_rate=layer.compress_rate, indexer=layer.indexer is not None, attention_type=layer.attention_type,
        ))
    return tuple(plans)


def _peak_layer(layers: tuple[LayerPlan, ...]) -> LayerPlan | None:
    return max(layers, key=lambda p: p.peak_bytes, default=None)


def _calibration_parts(facts: ModelFacts, q: Quantization, statistics: int) -> list[tuple[str, int]]:
    """Activations, statistics and forward workspace of a calibrated method at one layer (none otherwise)."""
    if q.run is None:
        return []
    run = q.run
    width = f"{facts.residual_streams} x {facts.hidden}" if facts.residual_streams > 1 else f"{facts.hidden}"
    return [
        (f"calibration activations ({hidden_copies(q.calibration)} x {run.samples} x {run.seq_len} x {width})",
         activation_bytes(facts, run, q.dtype_bytes, q.calibration)),
        ("method statistics of that layer", statistics),
        (f"forward workspace (batch of {min(run.batch_size, run.samples)})", workspace_bytes(facts, run, q.dtype_bytes)),
    ]


def _layer_parts(facts: ModelFacts, q: Quantization, layers: tuple[LayerPlan, ...]) -> tuple[tuple[str, int], ...]:
    """The parts that one layer at a time adds, whichever memory holds it."""
    peak = _peak_layer(layers)
    if peak is None:
        return ()
    parts = [
        (f"largest decoder layer (layer {peak.index}, {q.dtype_name})", peak.working_bytes),
        ("its quantized output", peak.quantized_bytes),
        ("quantization temporaries (its largest tensor)", peak.temporary_bytes),
    ]
    return tuple(parts + _calibration_parts(facts, q, peak.statistics_bytes))


def _in_memory(facts: ModelFacts, q: Quantization, quantized: ArtifactBytes, layers: tuple[LayerPlan, ...],
               source: LoadedSource) -> MemoryEstimate:
    """The whole model loaded (with what loading left behind), its quantized copy and the largest transients."""
    largest_temporary = max([q.temporaries(facts, None), *(p.temporary_bytes for p in layers)])
    largest_statistics = max([q.statistics(facts, None), *(p.statistics_bytes for p in layers)])
    parts = [
        ("runtime (Python, torch, transformers, tokenizer)", RUNTIME_BYTES),
        (f"model ({q.dtype_name})", tensor_bytes(facts.tensors, q.dtype_bytes)),
        ("checkpoint pages mapped by the loader", source.mapped),
        ("loader staging copies kept by the allocator (dtype conversion)", source.converted),
        ("quantized copy being built", quantized.total - quantized.kept),
        ("quantization temporaries (largest tensor)", largest_temporary),
    ]
    if q.run is not None:
        parts += [
            ("calibration activations", activation_bytes(facts, q.run, q.dtype_bytes, q.calibration)),
            ("method statistics of the largest layer or lm_head", largest_statistics),
            ("forward workspace", workspace_bytes(facts, q.run, q.dtype_bytes)),
        ]
    return MemoryEstimate("host, in-memory path (whole model loaded)", tuple(parts))


def memory_estimates(facts: ModelFacts, q: Quantization, quantized: ArtifactBytes, layers: tuple[LayerPlan, ...],
                     source: LoadedSource) -> tuple[MemoryEstimate, MemoryEstimate, MemoryEstimate]:
    """Peak memory of the in-memory path, the streaming path and the accelerator.

    Args:
        facts: the model's facts.
        q: the recipe's quantization.
        quantized: the artifact in the recipe's layout.
        layers: the layer plans.
        source: what loading the source leaves resident besides the model (in-memory path).

    Returns:
        ``(in_memory, streaming, accelerator)``.
    """
    outside = tensor_bytes((t for t in facts.tensors if t.layer is None), q.dtype_bytes)
    layer_parts = _layer_parts(facts, q, layers)
    head_parts = (("lm_head quantization temporaries (after the layers)", q.temporaries(facts, None)),
                  ("lm_head method statistics (after the layers)", q.statistics(facts, None)))
    if sum(b for _, b in head_parts) > sum(b for _, b in layer_parts):  # the head stage, after the layers, is the peak
        layer_parts = head_parts
    streaming = [("runtime (Python, torch, transformers, tokenizer)", RUNTIME_BYTES),
                 ("embeddings, final norm, lm_head and the other tensors outside the layers (resident)", outside), *layer_parts]
    accelerator = [("runtime (CUDA context)", ACCELERATOR_BASELINE_BYTES), *layer_parts]
    return (
        _in_memory(facts, q, quantized, layers, source),
        MemoryEstimate("host, streaming path (one decoder layer at a time)", tuple(streaming)),
        MemoryEstimate("accelerator, one decoder layer at a time", tuple(accelerator)),
    )
