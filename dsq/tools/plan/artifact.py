"""Bytes of the artifact's weights in each layout: exact for dsq's writers, approximate for bitsandbytes.

The bytes are the sum of the tensors' data in the weight files (``data_offsets`` sizes of the
safetensors headers), headers excluded: what :func:`dsq.tools.testing.tensor_data_bytes` counts on
a written artifact.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from dsq.quantize.cost import ArtifactLayout, IntegerWeights, Matrices

from .facts import ModelFacts, tensor_bytes

DTYPE_BYTES: Mapping[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class FloatWeights:
    """Every tensor in floating point: the model without quantization."""

    exact: ClassVar[bool] = True
    bits: ClassVar[int] = 0

    def module_bytes(self, matrices: Matrices, experts: bool, dtype_bytes: int, model_has_quantized_experts: bool) -> None:
        """None: every module stays in floating point."""
        return

    def describe(self, dtype_name: str) -> str:
        return f"{dtype_name}, no quantization"


Layout = ArtifactLayout | FloatWeights


@dataclass(frozen=True)
class SchemeBytes:
    """Bytes of the artifact's weights in one format.

    Attributes:
        label: row name (``BF16``, ``INT4 g128 sym``, ``recipe: ...``).
        description: what is stored (scheme, kept dtype).
        tensor_bytes: bytes of every tensor's data in the artifact (file headers excluded).
        quantized_parameters: parameters stored as integers.
        kept_parameters: parameters stored in floating point.
        exact: the count follows the writer's layout exactly (False: an approximation).
    """

    label: str
    description: str
    tensor_bytes: int
    quantized_parameters: int
    kept_parameters: int
    exact: bool


@dataclass(frozen=True)
class ArtifactBytes:
    """The artifact of one layout.

    Attributes:
        total: bytes of every tensor.
        per_layer: bytes per decoder layer (None: outside the layers).
        quantized_parameters: weight elements stored as integers.
        kept: bytes of the floating-point tensors outside the quantized modules.
    """

    total: int
    per_layer: Mapping[int | None, int]
    quantized_parameters: int
    kept: int


def artifact_bytes(facts: ModelFacts, layout: Layout, dtype_bytes: int) -> ArtifactBytes:
    """Tensor bytes of the artifact in ``layout``.

    Args:
        facts: the model's facts.
        layout: the artifact layout.
        dtype_bytes: bytes per element of the kept tensors and the scales.

    Returns:
        The totals.
    """
    per_layer: dict[int | None, int] = {}
    handled: set[str] = set()
    quantized_params = 0
    for t in facts.targets:
        own = IntegerWeights(t.scheme) if t.scheme is not None and isinstance(layout, IntegerWeights) else layout  # a scheme rule
        size = own.module_bytes(t.shapes, t.experts, dtype_bytes, facts.has_quantized_experts) if t.quantize else None
        if size is None:
            continue
        handled.add(t.name)
        quantized_params += t.weight_params
        per_layer[t.layer] = per_layer.get(t.layer, 0) + size + t.bias * dtype_bytes
    kept = [tensor for tensor in facts.tensors if tensor.name.rpartition(".")[0] not in handled]
    for tensor in kept:
        per_layer[tensor.layer] = per_layer.get(tensor.layer, 0) + tensor.bytes(dtype_bytes)
    return ArtifactBytes(sum(per_layer.values()), per_layer, quantized_params, tensor_bytes(kept, dtype_bytes))


def scheme_row(facts: ModelFacts, label: str, layout: Layout, dtype_name: str) -> SchemeBytes:
    """One row of the artifact-bytes table.

    Args:
        facts: the model's facts.
        label: row name.
        layout: the artifact layout.
        dtype_name: the dtype of the kept tensors.

    Returns:
        The row.
    """
    found = artifact_bytes(facts, layout, DTYPE_BYTES[dtype_name])
    params = sum(t.numel for t in facts.tensors if t.parameter)
    quantized = found.quantized_parameters
    return SchemeBytes(label, layout.describe(dtype_name), found.total, quantized, params - quantized, layout.exact)


def comparison_layouts(dtype_name: str) -> tuple[tuple[str, Layout, str], ...]:
    """BF16, INT8 per-channel, INT4 g128 and INT4 g32 (symmetric), kept tensors in the recipe dtype.

    Args:
        dtype_name: the recipe dtype (kept tensors and scales of the integer formats).

    Returns:
        ``(label, layout, dtype of its floating-point tensors)`` triples.
    """
    from dsq.quantize import PerChannel, PerGroup, WeightScheme

    return (
        ("BF16", FloatWeights(), "bfloat16"),
        ("INT8 per-channel sym", IntegerWeights(WeightScheme(8, PerChannel(), True)), dtype_name),
        ("INT4 g128 sym", IntegerWeights(WeightScheme(4, PerGroup(128), True)), dtype_name),
        ("INT4 g32 sym", IntegerWeights(WeightScheme(4, PerGroup(32), True)), dtype_name),
    )
