"""Memory and time plans: what a recipe will need, from config.json and safetensors headers alone.

:func:`plan_checkpoint` builds the model on the ``meta`` device (no memory, even for DeepSeek-V3's
671B parameters), reads the safetensors headers when the checkpoint has weight files (never the
tensor data) and estimates, for a recipe:

* parameters, exactly, by category and per decoder layer (:mod:`.facts`, :mod:`.categories`);
* bytes of the source weights (:mod:`.source`: from the headers, or from the config: BF16/FP32, or
  FP8 e4m3 with 128 x 128 block scales (fp32 ``weight_scale_inv`` in DeepSeek-V3/V3.2, e8m0 ``.scale`` in
  DeepSeek-V4, whose routed experts are FP4 e2m1 at 4.25 bits per weight)) and of the artifact for BF16,
  INT8 per-channel, INT4 g128, INT4 g32 and the recipe's own scheme (:mod:`.artifact`: the layout
  dsq writes, exact);
* peak host memory of the in-memory path and of the streaming path (one decoder layer at a time),
  and peak accelerator memory when calibration places one layer at a time on the accelerator
  (:mod:`.memory`, :mod:`.statistics`; DeepSeek-V4's layers with their compressors, indexers and
  hyper-connection parameters, its activations ``hc_mult`` streams wide; no KV cache: calibration runs
  without one);
* calibration FLOPs and the time they take at a given throughput (:mod:`.flops`).

What a method costs (its artifact layout, its calibration statistics, how it rounds experts) comes
from its registered :class:`~dsq.quantize.cost.MethodCost`, never from its config class. Every
figure but the parameter and byte counts is an estimate: a model of what dsq holds and computes,
checked against the peak RSS of real runs in ``tests/tools/test_plan_measured.py``.

Example:
    >>> plan = plan_checkpoint("dsq/assets/public_configs/deepseek-v3", load_recipe(None))
    >>> plan.parameters.total
    671026404352
    >>> print(plan.to_markdown())
"""
from __future__ import annotations

from .artifact import DTYPE_BYTES, FloatWeights, SchemeBytes, comparison_layouts
from .categories import CATEGORIES, ParameterCounts
from .flops import DEFAULT_CPU_TFLOPS, DEFAULT_GPU_TFLOPS, TimeEstimate
from .memory import ACCELERATOR_BASELINE_BYTES, RUNTIME_BYTES
from .planner import plan_checkpoint, read_plan_config
from .render import render_markdown
from .results import LayerPlan, MemoryEstimate, Plan
from .source import (
    SourceBytes,
    SourcePart,
    TensorSet,
    expert_source_format,
    fp8_source_format,
)

__all__ = [
    "ACCELERATOR_BASELINE_BYTES",
    "CATEGORIES",
    "DEFAULT_CPU_TFLOPS",
    "DEFAULT_GPU_TFLOPS",
    "DTYPE_BYTES",
    "RUNTIME_BYTES",
    "FloatWeights",
    "LayerPlan",
    "MemoryEstimate",
    "ParameterCounts",
    "Plan",
    "SchemeBytes",
    "SourceBytes",
    "SourcePart",
    "TensorSet",
    "TimeEstimate",
    "comparison_layouts",
    "expert_source_format",
    "fp8_source_format",
    "plan_checkpoint",
    "read_plan_config",
    "render_markdown",
]
