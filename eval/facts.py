"""What each stage did to a report row's model, as typed facts.

A row of the report (:class:`dsq.eval.harness.ModelMetrics`) carries the facts of the stages that
made its model: quantization, the transformers reload check, the ONNX export, training, LoRA and
merging. In ``report.json`` they are the row's ``extra`` object, one key per stage present
(``extra.quantization``, ``extra.reload_check``, ``extra.onnx``, ``extra.training``,
``extra.lora``, ``extra.merge``).

Training, LoRA and merge facts come from :mod:`dsq.finetune`, which this package does not import:
their holders keep the finetune objects' ``to_dict()`` forms (JSON-ready mappings) where the
structure is finetune's own.
"""
from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from dsq.eval.reload import ReloadCheck
from dsq.quantize.api import QuantizationReport

if TYPE_CHECKING:
    from dsq.export import ExportResult
    from dsq.quantize.streaming import StreamedArtifact

SQNR_KEY = "weight_sqnr"
"""Key of the compact SQNR summary in a row's ``extra["quantization"]``."""
WORST_MODULES = 10
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ----------------------------------------------------------------------------- weight SQNR summary


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def layer_of(name: str) -> int | None:
    """The decoder layer index in a module name (``model.layers.3.mlp`` -> 3), ``None`` outside the layers."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _worst_expert(module: dict) -> tuple[int, float] | None:
    """(index, SQNR) of the module's lowest finite per-expert SQNR, if it has any."""
    values = [(i, v) for i, v in enumerate(module.get("expert_sqnr_db") or []) if finite_number(v) is not None]
    return min(values, key=lambda iv: iv[1]) if values else None


def _worst_entries(measured: list[dict], worst: int) -> list[dict]:
    entries = []
    for m in sorted(measured, key=lambda m: m["sqnr_db"])[:worst]:
        entry = {"name": m["name"], "kind": m["kind"], "sqnr_db": m["sqnr_db"]}
        expert = _worst_expert(m)
        if expert is not None:
            entry["worst_expert"], entry["worst_expert_sqnr_db"] = expert
        entries.append(entry)
    return entries


def _per_layer(measured: list[dict]) -> list[dict]:
    layers: dict[int | None, dict] = {}
    for m in measured:
        key = layer_of(m["name"])
        group = layers.setdefault(key, {"layer": key, "modules": 0, "min_sqnr_db": math.inf, "module": None})
        group["modules"] += 1
        if m["sqnr_db"] < group["min_sqnr_db"]:
            group["min_sqnr_db"], group["module"] = m["sqnr_db"], m["name"]
        expert = _worst_expert(m)
        if expert is not None and expert[1] < group.get("worst_expert_sqnr_db", math.inf):
            group["worst_expert_sqnr_db"] = expert[1]
    return [layers[k] for k in sorted(layers, key=lambda k: (k is None, k or 0))]


def weight_sqnr_summary(modules: list[dict], worst: int = WORST_MODULES) -> dict | None:
    """The compact form of per-module weight SQNRs that a report row carries.

    Args:
        modules: ``QuantizationReport.to_dict()["modules"]`` entries (``name``, ``kind``,
            ``quantized``, ``sqnr_db``, ``expert_sqnr_db``).
        worst: How many of the lowest-SQNR modules to list.

    Returns:
        ``None`` when no quantized module has a finite ``sqnr_db`` (e.g. bitsandbytes), else
        ``modules`` (count measured), ``min_db``, ``median_db``, ``worst_modules`` (lowest first:
        ``name``, ``kind``, ``sqnr_db`` and for fused experts ``worst_expert`` and
        ``worst_expert_sqnr_db``) and ``per_layer`` (model order: ``layer`` (decoder layer index, or
        ``None`` outside the layers), ``modules``, ``min_sqnr_db``, ``module``, and for layers with
        experts ``worst_expert_sqnr_db``).
    """
    measured = [m for m in modules if m.get("quantized") and finite_number(m.get("sqnr_db")) is not None]
    if not measured:
        return None
    values = [m["sqnr_db"] for m in measured]
    return {
        "modules": len(measured),
        "min_db": min(values),
        "median_db": statistics.median(values),
        "worst_modules": _worst_entries(measured, worst),
        "per_layer": _per_layer(measured),
    }


# ----------------------------------------------------------------------------- quantization


@dataclass(frozen=True)
class StreamingFacts:
    """How a checkpoint streamed one decoder layer at a time was read and written.

    Attributes:
        seconds_reading: Wall time reading (and dequantizing) layers.
        seconds_writing: Wall time writing the artifact's weight files.
        unused_checkpoint_tensors: Checkpoint tensors the model does not use.
        weight_files: Weight files written.
    """

    seconds_reading: float
    seconds_writing: float
    unused_checkpoint_tensors: int
    weight_files: int

    @classmethod
    def of(cls, streamed: StreamedArtifact) -> StreamingFacts:
        """The facts of :func:`dsq.quantize.streaming.quantize_streaming`'s result."""
        return cls(streamed.seconds_reading, streamed.seconds_writing, len(streamed.unused_tensors), len(streamed.files))

    def to_dict(self) -> dict:
        return {"seconds_reading": round(self.seconds_reading, 3), "seconds_writing": round(self.seconds_writing, 3),
                "unused_checkpoint_tensors": self.unused_checkpoint_tensors, "weight_files": self.weight_files}


@dataclass(frozen=True)
class QuantizationFacts:
    """How a row's model was quantized in this run.

    The quantization report is read once (:attr:`record`, its ``to_dict()``) when first needed; it
    must not change after that. The record also serves the artifact's ``manifest.json``.

    Attributes:
        report: What the quantization did to every parameter.
        seconds: Wall time of the quantization.
        peak_rss_bytes: Peak process RSS while quantizing (``None``: not measured).
        streaming: How a streamed checkpoint was read and written (``None``: quantized in memory).
    """

    report: QuantizationReport
    seconds: float
    peak_rss_bytes: int | None
    streaming: StreamingFacts | None = None

    source = "the run's quantization record"
    """Where the plotted record comes from, as the plots' skip reasons name it."""

    @cached_property
    def record(self) -> dict:
        """``report.to_dict()``: the full record, per-module entries included (plots, manifest)."""
        return self.report.to_dict()

    def to_dict(self) -> dict:
        """The row's ``extra["quantization"]``: the record without its ``modules`` list, the weight SQNR
        summary (:data:`SQNR_KEY`, when measured), ``seconds``, ``peak_rss_bytes`` and ``streaming``."""
        d = dict(self.record)
        sqnr = weight_sqnr_summary(d.pop("modules"))
        if sqnr is not None:
            d[SQNR_KEY] = sqnr
        d["seconds"] = round(self.seconds, 3)
        d["peak_rss_bytes"] = self.peak_rss_bytes
        if self.streaming is not None:
            d["streaming"] = self.streaming.to_dict()
        return d


@dataclass(frozen=True)
class ArtifactQuantization:
    """A saved artifact's quantization record, as its ``manifest.json["quantization"]`` holds it.

    Attributes:
        record: ``QuantizationReport.to_dict()`` as saved with the artifact.
    """

    record: Mapping[str, Any]

    source = "manifest.json quantization"
    """Where the plotted record comes from, as the plots' skip reasons name it."""

    def to_dict(self) -> dict | None:
        """The row's ``extra["quantization"]``: ``method``, ``scheme`` and the weight SQNR summary;
        ``None`` (no such key) when the record has no measured SQNR."""
        sqnr = weight_sqnr_summary(list(self.record.get("modules") or []))
        if sqnr is None:
            return None
        return {"method": self.record.get("method"), "scheme": self.record.get("scheme"), SQNR_KEY: sqnr}


# ----------------------------------------------------------------------------- reload check


@dataclass(frozen=True)
class ReloadNotRun:
    """The artifact's transformers reload check was turned off (``eval.reload_check: false``): the
    row's ``extra["reload_check"]`` is ``null``."""


def reload_check_dict(check: ReloadCheck | ReloadNotRun) -> dict | None:
    """A row's ``extra["reload_check"]``."""
    return None if isinstance(check, ReloadNotRun) else check.to_dict()


# ----------------------------------------------------------------------------- ONNX


@dataclass(frozen=True)
class OnnxFacts:
    """An ONNX export evaluated as its own row: where it is and how it matched PyTorch.

    Attributes:
        path: The export directory.
        accuracy_level: MatMulNBits accuracy level.
        cpu_target: The CPU class the int8 kernels were chosen for (``portable`` or ``vnni``).
        weight_op: How the weights are carried (``matmul_nbits`` or ``dequantize_linear``).
        embedding: The quantized input embedding's description (``None``: kept as it was).
        max_abs_logit_diff: Largest absolute logit difference against PyTorch in the validation.
        tolerance: The validation's tolerance.
        greedy_tokens_equal: Greedy decoding gave PyTorch's tokens.
        greedy_tie_margins: Top-two logit margins of PyTorch where the greedy tokens differed.
        matmul_nbits: ``com.microsoft::MatMulNBits`` nodes in the graph.
        int8_matmul: W8A8 matmul nodes (``MatMulInteger``, or ``MatMulIntegerToFloat`` for the vnni target).
        experts_in_graph: Routed experts in the graph.
        onnx_bytes: Bytes of the graph and its external data.
        seconds: Wall time of the export.
        ppl_vs_torch_pct: Perplexity of ONNX Runtime relative to PyTorch's for the same model, in %
            (``None``: no PyTorch row to compare with).
    """

    path: str
    accuracy_level: int
    weight_op: str
    embedding: str | None
    max_abs_logit_diff: float
    tolerance: float
    greedy_tokens_equal: bool
    greedy_tie_margins: tuple[float, ...]
    matmul_nbits: int
    int8_matmul: int
    experts_in_graph: int
    onnx_bytes: int
    seconds: float
    ppl_vs_torch_pct: float | None = None
    cpu_target: str = "portable"

    @classmethod
    def of(cls, result: ExportResult, ppl_vs_torch_pct: float | None = None) -> OnnxFacts:
        """The facts of :func:`dsq.export.export_onnx`'s result.

        Args:
            result: The export.
            ppl_vs_torch_pct: :func:`dsq.eval.gates.ppl_increase_pct` of the ONNX row over the PyTorch row.
        """
        v = result.validation
        return cls(
            path=str(result.path), accuracy_level=result.accuracy_level, weight_op=result.weight_op,
            embedding=result.plan.embedding, max_abs_logit_diff=v.max_abs_diff, tolerance=v.tolerance,
            greedy_tokens_equal=v.greedy_equal,
            greedy_tie_margins=tuple(c.tie_margin for c in v.cases if c.tie_margin is not None),
            matmul_nbits=result.ops.get("com.microsoft::MatMulNBits", 0), int8_matmul=result.ops.get(result.plan.int8_op, 0),
            experts_in_graph=sum(result.plan.experts.values()), onnx_bytes=result.onnx_bytes, seconds=result.seconds,
            ppl_vs_torch_pct=ppl_vs_torch_pct, cpu_target=result.cpu_target,
        )

    def to_dict(self) -> dict:
        """The row's ``extra["onnx"]`` (``ppl_vs_torch_pct`` only when measured; seconds to 0.01)."""
        d = {
            "path": self.path, "accuracy_level": self.accuracy_level, "cpu_target": self.cpu_target, "weight_op": self.weight_op,
            "embedding": self.embedding, "max_abs_logit_diff": self.max_abs_logit_diff, "tolerance": self.tolerance,
            "greedy_tokens_equal": self.greedy_tokens_equal, "greedy_tie_margins": list(self.greedy_tie_margins),
            "matmul_nbits": self.matmul_nbits, "int8_matmul": self.int8_matmul,
            "experts_in_graph": self.experts_in_graph, "onnx_bytes": self.onnx_bytes, "seconds": round(self.seconds, 2),
        }
        if self.ppl_vs_torch_pct is not None:
            d["ppl_vs_torch_pct"] = self.ppl_vs_torch_pct
        return d


# ----------------------------------------------------------------------------- training, LoRA, merge


@dataclass(frozen=True)
class TrainingFacts:
    """What a training run did.

    Attributes:
        result: ``dsq.finetune.trainer.TrainResult.to_dict()``: steps, tokens seen, world size, the
            loss and validation curves, the final validation loss and perplexity.
        peak_rss_bytes: Peak process RSS while training.
        data: ``TrainingData.summary.to_dict()``: the training and validation data.
    """

    result: Mapping[str, Any]
    peak_rss_bytes: int | None
    data: Mapping[str, Any]

    def to_dict(self) -> dict:
        """The row's ``extra["training"]``: ``result``'s keys, ``peak_rss_bytes`` and ``data``."""
        return {**self.result, "peak_rss_bytes": self.peak_rss_bytes, "data": dict(self.data)}


@dataclass(frozen=True)
class LoraFacts:
    """The LoRA adapter a row's model carries.

    Attributes:
        base: What it adapts: ``"fp"`` or the quantized base's candidate name.
        trainable_params: Parameters the adapter trains.
        total_params: All parameters of the adapted model.
        r: The adapter's rank.
        alpha: Its scaling numerator (scale = alpha / r).
    """

    base: str
    trainable_params: int
    total_params: int
    r: int
    alpha: float

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params

    def to_dict(self) -> dict:
        """The row's ``extra["lora"]``."""
        return {"base": self.base, "trainable_params": self.trainable_params, "total_params": self.total_params,
                "trainable_share": self.trainable_share, "r": self.r, "alpha": self.alpha}


@dataclass(frozen=True)
class ExactMerge:
    """An adapter added to floating-point weights: the merged model is the adapter model."""

    def to_dict(self) -> dict:
        """The row's ``extra["merge"]``."""
        return {"exact": True}


@dataclass(frozen=True)
class RequantizedMerge:
    """An adapter merged into a quantized base: dequantize, add, re-quantize with the same scheme.

    Attributes:
        drift_vs_adapter: ``dsq.finetune.merge.MergeDrift.to_dict()``: how far the merged model's
            outputs are from the adapter model's.
        modules: Per re-quantized module, its record's ``to_dict()``.
    """

    drift_vs_adapter: Mapping[str, Any]
    modules: Sequence[Mapping[str, Any]]

    def to_dict(self) -> dict:
        """The row's ``extra["merge"]``."""
        return {"exact": False, "drift_vs_adapter": dict(self.drift_vs_adapter), "modules": [dict(m) for m in self.modules]}
