"""The plan as data: parameters, decoder layers, bytes, memory and time, with its JSON form."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .artifact import SchemeBytes
from .categories import ParameterCounts
from .flops import TimeEstimate
from .serving import ServingPlan
from .source import SourceBytes


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer.

    Attributes:
        index: layer number.
        moe: the layer has routed experts (otherwise a dense MLP).
        parameters: parameters of the layer.
        working_bytes: the layer's tensors in the recipe dtype (what calibration holds).
        quantized_bytes: the layer in the recipe's artifact format.
        statistics_bytes: calibration statistics the recipe's method holds for this layer at its peak.
        temporary_bytes: transient memory of quantizing the layer's largest tensor.
        forward_flops_per_token: one routed forward of the layer, per token (calibration seq_len).
        compress_rate: source tokens per compressed KV entry its attention adds (DeepSeek-V4's CSA 4, HCA 128; 0: none).
        indexer: its attention has a sparse-attention indexer (DeepSeek-V3.2's DSA, DeepSeek-V4's CSA).
        attention_type: transformers' name of its attention (``config.layer_types``); empty when none.
    """

    index: int
    moe: bool
    parameters: int
    working_bytes: int
    quantized_bytes: int
    statistics_bytes: int
    temporary_bytes: int
    forward_flops_per_token: float
    compress_rate: int = 0
    indexer: bool = False
    attention_type: str = ""

    @property
    def peak_bytes(self) -> int:
        """What holding and quantizing this layer adds at its peak."""
        return self.working_bytes + self.quantized_bytes + self.statistics_bytes + self.temporary_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    """A peak memory estimate as a sum of named parts.

    Attributes:
        label: which path and which memory.
        parts: ``(what, bytes)``.
    """

    label: str
    parts: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(b for _, b in self.parts)


@dataclass(frozen=True)
class Plan:
    """What a recipe needs for a checkpoint: parameters, bytes, memory and time.

    Attributes:
        checkpoint: the checkpoint directory.
        model_type: ``model_type`` of the config.
        architecture: the transformers class.
        config_only: no weight files: every byte count comes from the config.
        recipe: the recipe planned for (source and its settings, one line).
        method: the recipe's quantization method (None: no quantization).
        parameters: exact parameter counts.
        layers: every decoder layer.
        source: the source weights.
        schemes: artifact bytes per format (the recipe's own last).
        in_memory: peak host memory, whole model in memory.
        streaming: peak host memory, one decoder layer at a time.
        accelerator: peak accelerator memory, one layer at a time on the accelerator.
        time: calibration FLOPs and durations.
        notes: what the numbers leave out, and what the reader must know.
        serving: weights plus the KV cache of one sequence at 4k, 32k and 128k tokens (None: not estimated for
            this architecture; the notes say why).
    """

    checkpoint: str
    model_type: str
    architecture: str
    config_only: bool
    recipe: str
    method: str | None
    parameters: ParameterCounts
    layers: tuple[LayerPlan, ...]
    source: SourceBytes
    schemes: tuple[SchemeBytes, ...]
    in_memory: MemoryEstimate
    streaming: MemoryEstimate
    accelerator: MemoryEstimate
    time: TimeEstimate
    notes: tuple[str, ...] = field(default_factory=tuple)
    serving: ServingPlan | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: every field, plus totals and durations.

        Returns:
            The plan as plain data.
        """
        data = asdict(self)
        data["parameters"]["by_category"] = dict(self.parameters.by_category)
        for key in ("in_memory", "streaming", "accelerator"):
            estimate: MemoryEstimate = getattr(self, key)
            data[key] = {"label": estimate.label, "parts": dict(estimate.parts), "total_bytes": estimate.total}
        data["time"] = {
            "flops": dict(self.time.flops),
            "total_flops": self.time.total_flops,
            "seconds": {label: self.time.seconds(tflops) for label, tflops in self.time.throughputs},
            "tflops": dict(self.time.throughputs),
            "estimate": True,
        }
        return data

    def to_markdown(self) -> str:
        """The plan as Markdown tables (readable in a terminal too).

        Returns:
            The text, ending with a newline.
        """
        from .render import render_markdown

        return render_markdown(self)
