"""What a quantization method costs: the facts ``dsq plan`` estimates bytes, memory and FLOPs from.

Every registered :class:`~dsq.quantize.method.Method` carries a :class:`MethodCost`:

* the artifact layout a config writes (:class:`IntegerWeights`, :class:`Int8Weights`,
  :class:`BnbBlocks`), which also counts the bytes of a module in that layout;
* what a config calibrates (:class:`Hessians`, :class:`ScaleSearch`, :class:`ActivationRanges`, or
  None): the statistics kept per module input and the searches run on them;
* how it rounds fused experts (:class:`Rounding`).

The planner computes with these facts and never looks at a config class. The byte constants are
what dsq's own code allocates on CPU (torch 2.13, measured with glibc's mmap threshold fixed so that
freed tensors are returned at once); ``tests/tools/test_plan_rounding.py`` measures them again.

Example:
    >>> config = GPTQConfig(WeightScheme(4, PerGroup(128)))
    >>> cost = cost_of(config)  # the registered method's cost
    >>> cost.layout(config).bits, cost.calibration(config)
    (4, Hessians(block_size=128, range_candidates=21, solve_batch=8))
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .scheme import WeightScheme

STATISTICS_BYTES = 4
"""Calibration statistics (channel maxima, sampled rows, solve copies) are fp32 whatever the model dtype."""

SUM_BYTES = 8
"""Running sums of calibration statistics (Hessians, channel sums) are fp64: each forward's fp32 contribution is
added exactly, so several processes sharing calibration reach the one-process totals."""

CHANNEL_VECTOR_BYTES = SUM_BYTES + STATISTICS_BYTES
"""Bytes per channel of an observed input's two vectors: the fp64 sum of |x| and the fp32 max of |x|."""

RANGE_CANDIDATES = 21
"""Ranges tried per group by the ``mse_scales`` search (shrink 1.00, 0.99, ..., 0.80)."""

ROUNDING_FLOPS = 10
"""FLOPs to round one weight element (scale, divide, round, clamp, error)."""

FACTORIZATION_FLOPS = 2.0
"""GPTQ's Cholesky, inverse and second Cholesky of one K x K Hessian cost about this many K^3 FLOPs."""

RTN_TEMPORARY_BYTES = 13.0
"""Peak bytes per element while round-to-nearest quantizes one 2-D tensor in one piece, whatever the model
dtype (fp32 copies of the weight, its expanded scales and the rounded values, then the int8 result).
Fused experts are rounded one expert at a time, so this applies to one expert."""

EXPERT_INTEGER_BYTES: Mapping[int, float] = {4: 0.55, 8: 0.2}
"""Bytes per element of a whole fused experts tensor, by bits, held beyond the module's packed output and
one expert's rounding temporaries while round-to-nearest gathers every expert's int8 values into one
tensor and packs it."""

STACK_PACK_BYTES: Mapping[int, float] = {4: 2.2, 8: 2.0}
"""The same when per-expert results (int8) exist before they are stacked and packed (GPTQ, AWQ): the
per-expert results and their stacked copy."""

BLOCK_TRAINING_PEAK_BYTES: Mapping[int, float] = {4: 32.0, 2: 37.0}
"""Peak bytes per quantized weight element of a decoder block while learned rounding trains it on a batch
of few tokens, by bytes of the model dtype (4: float32, 2: bfloat16): the fp32 offset, its snapshot and its
gradient, what the rounded weights of one step keep for the backward pass (expanded scales, the integers
before and after clamping, the rounded weight; in bfloat16 also the weight's fp32 copy) and the gradients
that pass through them. Measured as the peak RSS growth of ``_autoround_layer`` (one step, one sequence of
16 tokens, glibc's mmap threshold fixed) on DeepSeek-V3-shaped blocks of 2.6 M (dense) and 7.2 M (MoE)
weights: 33.6 / 39.1-39.6 bytes per element, less the rounding temporaries the plan counts apart."""

BLOCK_TRAINING_HELD_BYTES: Mapping[int, float] = {4: 23.0, 2: 30.0}
"""The same, per element, at the start of the backward pass, where one batch's saved activations
(:data:`BLOCK_ACTIVATION_BYTES`) are held beside it. Measured as the intercept of the peak RSS growth
against the batch's tokens (2048 and 4096 tokens, same blocks): 23.8 (float32) / 31.0 (bfloat16)."""

BLOCK_ACTIVATION_BYTES: Mapping[int, float] = {4: 6.0, 2: 4.6}
"""Bytes the backward pass of a block holds per token of the batch and per element of the inputs and
outputs of its Linears (routed experts counted ``top_k`` times per token), by bytes of the model dtype:
autograd's saved activations and the first activation gradients. Measured as the slope of the same
growth: float32 5.9 (MoE) to 6.2 (dense), bfloat16 4.5 (MoE); attention through SDPA keeps no
sequence x sequence tensor."""

HEAD_LOGIT_COPIES = 3
"""fp32 logits per token of the batch while a Linear outside the decoder layers (``lm_head``) is trained
alone: its full-precision target, its output and the output's gradient. (Measured: 11.8 bytes per logit
for a [16384, 256] lm_head at 2048 and 4096 tokens.)"""

LEARNED_ROUNDING_FLOPS = 26
"""FLOPs per quantized weight element of one learned-rounding step: the rounded weight (divide, offset,
round, clamp, scale), its backward pass to the offsets and clipping factors, and the signed update.
Counted as the elements written by every non-matmul operator of a step on a [1024, 1024] Linear:
24.1 (symmetric) / 28.3 (asymmetric)."""

Matrices = Sequence[tuple[int, int, int]]
"""``(count, out, in)`` of the weight matrices of one module: one for a Linear, per expert for fused experts."""


# ----------------------------------------------------------------------------- artifact layouts


@dataclass(frozen=True)
class IntegerWeights:
    """dsq's integer weights (rtn, gptq, awq): compressed-tensors pack-quantized / int-quantized.

    Per matrix ``[out, in]``: 4-bit ``weight_packed`` int32 ``[out, ceil(in/8)]`` and ``weight_shape``
    int64[2]; 8-bit ``weight`` int8 ``[out, in]``, or packed int32 ``[out, ceil(in/4)]`` + shape when the
    model has quantized experts; ``weight_scale`` ``[out, groups]`` in the model dtype; asymmetric
    schemes add zero points (:func:`dsq.quantize.compressed_tensors_format.zero_point_bytes`).
    """

    scheme: WeightScheme
    exact: ClassVar[bool] = True

    @property
    def bits(self) -> int:
        return self.scheme.bits

    def module_bytes(self, matrices: Matrices, experts: bool, dtype_bytes: int, model_has_quantized_experts: bool) -> int:
        """Bytes of one quantized module.

        Args:
            matrices: its weight matrices.
            experts: the module is fused experts.
            dtype_bytes: bytes per element of the model dtype (scales).
            model_has_quantized_experts: some fused experts of the model are quantized (8-bit is then packed).

        Returns:
            Bytes of its tensors in the artifact (bias excluded).
        """
        packed8 = experts or model_has_quantized_experts
        return sum(count * self.matrix_bytes(out, inp, dtype_bytes, packed8) for count, out, inp in matrices)

    def matrix_bytes(self, out: int, inp: int, dtype_bytes: int, packed8: bool) -> int:
        """Bytes of one ``[out, inp]`` matrix: integers, scales, zero points (8-bit packed when ``packed8``)."""
        from .compressed_tensors_format import zero_point_bytes

        groups = self.scheme.granularity.num_groups(inp)
        packed = self.scheme.bits == 4 or packed8
        total = out * groups * dtype_bytes + zero_point_bytes(out, inp, self.scheme, packed)
        if self.scheme.bits == 4:
            return total + 4 * out * math.ceil(inp / 8) + 16
        if packed8:
            return total + 4 * out * math.ceil(inp / 4) + 16
        return total + out * inp

    def describe(self, dtype_name: str) -> str:
        return f"{self.scheme.describe()}, scales and kept tensors {dtype_name}"


@dataclass(frozen=True)
class Int8Weights:
    """W8A8: int8 ``weight`` ``[out, in]``, fp32 ``weight_scale`` ``[out, 1]``, and with static activations
    an fp32 ``input_scale`` per module (per expert and projection for fused experts)."""

    static_inputs: bool
    exact: ClassVar[bool] = True
    bits: ClassVar[int] = 8

    def module_bytes(self, matrices: Matrices, experts: bool, dtype_bytes: int, model_has_quantized_experts: bool) -> int:
        """Bytes of one quantized module (see :meth:`IntegerWeights.module_bytes`)."""
        per_input = 4 if self.static_inputs else 0
        return sum(count * (out * inp + 4 * out + per_input) for count, out, inp in matrices)

    def describe(self, dtype_name: str) -> str:
        inputs = "static fp32 input scales" if self.static_inputs else "dynamic activations"
        return f"int8 per-channel sym weights, fp32 scales, {inputs}; kept tensors {dtype_name}"


@dataclass(frozen=True)
class BnbBlocks:
    """bitsandbytes (approximate): 4-bit values two per byte + fp32 absmax per block, or int8 + fp32 row
    scales. Only plain Linears are converted: fused experts stay in the model dtype."""

    bits: int
    blocksize: int
    double_quant: bool
    exact: ClassVar[bool] = False

    def module_bytes(self, matrices: Matrices, experts: bool, dtype_bytes: int, model_has_quantized_experts: bool) -> int | None:
        """Bytes of one converted Linear; None for fused experts, which stay in floating point."""
        if experts:
            return None
        (_, out, inp), = matrices
        numel = out * inp
        if self.bits == 8:
            return numel + 4 * out
        blocks = math.ceil(numel / self.blocksize)
        absmax = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 if self.double_quant else 4 * blocks
        return math.ceil(numel / 2) + absmax + 4 * 16 + 256  # + quant map and quant state

    def describe(self, dtype_name: str) -> str:
        kind = "int8 (LLM.int8)" if self.bits == 8 else f"4-bit, block {self.blocksize}"
        return f"bitsandbytes {kind}; experts and kept tensors {dtype_name} (approximate)"


ArtifactLayout = IntegerWeights | Int8Weights | BnbBlocks


# ----------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Hessians:
    """GPTQ (arXiv:2210.17323): an fp64 K x K Hessian sum (and two K vectors) per quantized module input of
    width K, one per routed expert input, plus the experts' shared input; held one stage at a time
    (attention, then the MLP). Solving ``solve_batch`` weights ``[out, K]`` of one shape together holds,
    per weight, fp32 working copies of it (:attr:`weight_copies`: the stacked copy, its column-major and
    permuted forms, the integers) and of its Hessian (:attr:`hessian_copies`: the permuted copy, the
    damped one, its factors); measured peaks are 3.2-4.8 x (out K + K^2) fp32 per weight.

    Attributes:
        block_size: lazy-update block width in columns.
        range_candidates: ranges tried per group (1: min/max).
        solve_batch: weights of one shape solved together (GPTQ's ``expert_chunk``).
    """

    block_size: int
    range_candidates: int
    solve_batch: int = 1
    weight_copies: ClassVar[int] = 8
    hessian_copies: ClassVar[int] = 3

    def solve_bytes(self, count: int, out: int, k: int) -> int:
        """Working set of solving ``count`` weights ``[out, k]`` (``solve_batch`` of them at a time)."""
        return min(count, self.solve_batch) * STATISTICS_BYTES * (self.weight_copies * out * k + self.hessian_copies * k * k)


@dataclass(frozen=True)
class ScaleSearch:
    """AWQ (arXiv:2306.00978): per observed input of width K (every Linear, every routed expert, the
    experts' shared input) two fp32 channel vectors and up to ``search_tokens`` sampled rows; the block
    inputs of the searched calls are kept to replay; a second collector with ``clip``.

    Attributes:
        search_tokens: calibration rows kept per input for the searches.
        grid: scale exponents tried per mapping.
        clip: a clipping search after scaling (one more statistics pass and collector).
        range_candidates: ranges tried per group when rounding (1: min/max).
    """

    search_tokens: int
    grid: int
    clip: bool
    range_candidates: int


@dataclass(frozen=True)
class ActivationRanges:
    """SmoothQuant (arXiv:2211.10438) and static W8A8 input scales: two fp32 channel vectors per observed
    input (every Linear, every routed expert), collected by ``passes`` statistics forwards per layer.

    Attributes:
        passes: statistics forwards with every expert per layer (smoothing, static scales).
    """

    passes: int


@dataclass(frozen=True)
class BlockTraining:
    """Learned rounding (SignRound, arXiv:2309.05516): each decoder block is trained against its
    full-precision outputs, which are kept beside its inputs (one more hidden-state tensor per
    calibration sequence); every quantized weight element of the block holds an fp32 rounding offset
    and its gradient, and the block's activations are kept for the backward pass of one batch.

    Attributes:
        steps: forward and backward passes of one calibration batch per block.
        batch_size: calibration sequences per step.
    """

    steps: int
    batch_size: int


Calibration = Hessians | ScaleSearch | ActivationRanges | BlockTraining


# ----------------------------------------------------------------------------- rounding and the method's cost


@dataclass(frozen=True)
class Rounding:
    """How fused experts ``[E, 2I, H]`` are rounded into one integer tensor and packed.

    Attributes:
        one_expert_temporaries: the rounding temporaries of one expert are alive at the peak (round to
            nearest expert by expert); otherwise per-expert results already exist (GPTQ, AWQ).
        expert_integer_bytes: bytes per element of the whole experts tensor while its integers are
            gathered and packed, by bits.
    """

    one_expert_temporaries: bool
    expert_integer_bytes: Mapping[int, float]


EXPERT_BY_EXPERT = Rounding(one_expert_temporaries=True, expert_integer_bytes=EXPERT_INTEGER_BYTES)
"""Round to nearest one expert at a time into one int8 tensor, packed expert by expert."""

STACKED_EXPERTS = Rounding(one_expert_temporaries=False, expert_integer_bytes=STACK_PACK_BYTES)
"""Per-expert results stacked, then packed (GPTQ, AWQ)."""


@dataclass(frozen=True)
class MethodCost:
    """What the planner needs to know about a method.

    Attributes:
        layout: the artifact layout a config of the method writes.
        calibration: what a config calibrates (None: it needs no calibration data).
        rounding: how it rounds fused experts.
    """

    layout: Callable[[Any], ArtifactLayout]
    calibration: Callable[[Any], Calibration | None]
    rounding: Rounding


def range_candidates(mse_scales: bool) -> int:
    """Ranges tried per group: :data:`RANGE_CANDIDATES` with the range search, else one (min/max)."""
    return RANGE_CANDIDATES if mse_scales else 1


def integer_layout(config: Any) -> IntegerWeights:
    """The layout of a weight-only integer method's config (its ``scheme``)."""
    return IntegerWeights(config.scheme)


def no_calibration(config: Any) -> None:
    """``calibration`` of a method that reads no calibration data."""
    return None




def cost_of(config: object) -> MethodCost:
    """The cost of ``config``'s method (``method_of(config).cost``).

    Raises:
        TypeError: ``config`` is not the config of a registered method.
    """
    from .method import method_of

    return method_of(config).cost
