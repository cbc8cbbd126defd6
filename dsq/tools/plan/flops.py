"""Calibration FLOPs of a method (from its :class:`~dsq.quantize.cost.MethodCost`) and the time they take."""
from __future__ import annotations

import math
from dataclasses import dataclass

from dsq.quantize.cost import (
    FACTORIZATION_FLOPS,
    LEARNED_ROUNDING_FLOPS,
    ROUNDING_FLOPS,
    ActivationRanges,
    BlockTraining,
    Calibration,
    Hessians,
    ScaleSearch,
)

from .facts import LayerShape, ModelFacts
from .statistics import CalibrationRun

DEFAULT_GPU_TFLOPS = 50.0
"""Default GPU throughput: about 75% of an H100's 67 TFLOPS fp32 peak (dsq's statistics are fp32)."""

DEFAULT_CPU_TFLOPS = 1.0
"""Default CPU throughput: sustained fp32 matmul rate of a multi-core server (a laptop: ~0.2)."""


@dataclass(frozen=True)
class TimeEstimate:
    """Calibration compute and its duration at some throughputs.

    Attributes:
        flops: ``(what, FLOPs)``.
        throughputs: ``(label, TFLOPS)`` the duration is given for.
    """

    flops: tuple[tuple[str, float], ...]
    throughputs: tuple[tuple[str, float], ...]

    @property
    def total_flops(self) -> float:
        return sum(f for _, f in self.flops)

    def seconds(self, tflops: float) -> float:
        """Seconds for :attr:`total_flops` at ``tflops`` (10^12 FLOP/s)."""
        return self.total_flops / (tflops * 1e12)


def throughputs(tflops: float | None) -> tuple[tuple[str, float], ...]:
    """The throughputs a duration is given for: ``tflops``, or the GPU and CPU defaults."""
    if tflops is not None:
        if not tflops > 0:
            raise ValueError(f"tflops must be positive, got {tflops}")
        return (("given", float(tflops)),)
    return (("GPU default", DEFAULT_GPU_TFLOPS), ("CPU default", DEFAULT_CPU_TFLOPS))


def _score_flops(facts: ModelFacts, layer: LayerShape, seq_len: int) -> float:
    """Attention scores and weighted values per token over :meth:`LayerShape.keys` (eager attention computes
    every score; a sliding window or an indexer's selection only masks them), plus the indexer's own scores
    (``heads x head_dim`` per scored key, one key per ``rate`` tokens)."""
    scores = 2.0 * facts.heads * layer.keys(seq_len) * (facts.qk_dim + facts.v_dim)
    if layer.indexer is not None:
        scores += 2.0 * layer.indexer.heads * layer.indexer.head_dim * (seq_len // layer.indexer.rate)
    return scores


def _attention_flops(facts: ModelFacts, layer: LayerShape, seq_len: int) -> float:
    """Attention Linears (compressors and indexers included), scores, and the hyper-connection mixing of the block."""
    return 2.0 * (layer.attention_linear + layer.mixer_params / 2) + _score_flops(facts, layer, seq_len)


def _mlp_flops(facts: ModelFacts, layer: LayerShape) -> float:
    """Routed MLP/MoE forward per token: dense or shared Linears, router, top-k experts, and the
    hyper-connection mixing of the block."""
    experts = min(facts.top_k, layer.experts) * layer.expert_size
    return 2.0 * (layer.mlp_linear + layer.router + experts + layer.mixer_params / 2)


def routed_flops(facts: ModelFacts, layer: LayerShape, seq_len: int) -> float:
    """FLOPs per token of one routed forward of ``layer`` at calibration length ``seq_len``."""
    return _attention_flops(facts, layer, seq_len) + _mlp_flops(facts, layer)


def _all_experts_flops(facts: ModelFacts, layer: LayerShape, seq_len: int) -> float:
    """A statistics forward per token: the routed forward plus every expert's gate/up on every token."""
    gate_up = 2.0 * layer.experts * (2 * layer.expert_size / 3)
    return routed_flops(facts, layer, seq_len) + gate_up


def _quantized_weights(facts: ModelFacts) -> int:
    return sum(t.weight_params for t in facts.targets if t.quantize)


def _hessian_flops(facts: ModelFacts, method: Hessians, run: CalibrationRun) -> list[tuple[str, float]]:
    """Layer forwards (one per stage, the experts' stage with every expert, one to recompute outputs),
    Hessian accumulation (2 N K^2 each), factorization (~2 K^3) and the column updates."""
    n = run.tokens
    forward = hessian = solve = 0.0
    for layer in facts.layers:
        experts_quantized = any(t.experts and t.quantize for t in facts.layer_targets(layer.index))
        stats_pass = _all_experts_flops if experts_quantized else routed_flops
        forward += n * (2 * routed_flops(facts, layer, run.seq_len) + stats_pass(facts, layer, run.seq_len))
    for t in facts.targets:
        if not t.quantize:
            continue
        hessian += sum(c * 2.0 * n * k * k for c, k in t.hessian_dims)
        solve += sum(c * FACTORIZATION_FLOPS * k ** 3 for c, k in t.hessian_dims)
        for m in t.matrices:
            solve += m.count * (m.out * m.inp * m.inp + 2.0 * m.out * m.inp * method.block_size)
            solve += m.count * m.out * m.inp * ROUNDING_FLOPS * method.range_candidates
        if t.experts:
            hessian += 2.0 * n * facts.hidden ** 2  # the experts' shared input
    return [("layer forwards", forward), ("Hessians (2 N K^2)", hessian), ("GPTQ solves (K^3, out K^2)", solve)]


def _scale_search_flops(facts: ModelFacts, method: ScaleSearch, run: CalibrationRun) -> list[tuple[str, float]]:
    """Statistics forward with every expert (+1 with clip), output forward, and the scale searches:
    (grid + 2) block forwards on the searched tokens per mapping, per-expert searches on sampled rows."""
    n = run.tokens
    searched = min(math.ceil(method.search_tokens / run.batch_tokens), run.batches) * run.batch_tokens
    rows = min(method.search_tokens, n)
    stats_passes = 2 if method.clip else 1
    forward = search = 0.0
    for layer in facts.layers:
        forward += n * (routed_flops(facts, layer, run.seq_len) + stats_passes * _all_experts_flops(facts, layer, run.seq_len))
        for b in layer.balances:
            if not b.quantized:
                continue
            if b.per_expert:
                search += layer.experts * (method.grid + 1) * 2.0 * rows * layer.expert_size / 3
                continue
            block = _attention_flops(facts, layer, run.seq_len) if b.attention else _mlp_flops(facts, layer)
            search += (method.grid + 2) * searched * block
    rounding = _quantized_weights(facts) * ROUNDING_FLOPS * method.range_candidates
    return [("layer forwards", forward), ("AWQ scale searches", search), ("rounding", float(rounding))]


def _activation_range_flops(facts: ModelFacts, method: ActivationRanges, run: CalibrationRun) -> list[tuple[str, float]]:
    forward = sum(
        run.tokens * (method.passes * _all_experts_flops(facts, layer, run.seq_len) + routed_flops(facts, layer, run.seq_len))
        for layer in facts.layers
    )
    return [("layer forwards", forward)]


def _block_training_flops(facts: ModelFacts, method: BlockTraining, run: CalibrationRun) -> list[tuple[str, float]]:
    """Per decoder layer: the full-precision targets, the loss before and after training and the quantized
    outputs (four forwards of every token), and ``steps`` forward and backward passes (about three
    forwards) of one batch. ``lm_head``, when quantized, is trained alone the same way, its target computed
    in every loss. The rounded weights are recomputed once per step and per loss pass."""
    n, batch = run.tokens, run.batch_tokens
    forward = training = 0.0
    for layer in facts.layers:
        per_token = routed_flops(facts, layer, run.seq_len)
        forward += 4 * n * per_token
        training += 3 * method.steps * batch * per_token
    for t in facts.layer_targets(None):
        if t.quantize:
            per_token = 2.0 * t.weight_params
            forward += 2 * 2 * n * per_token  # two loss passes, each with its target
            training += 3 * method.steps * batch * per_token  # target, forward, weight gradient
    weights = _quantized_weights(facts)
    rounding = weights * (method.steps * LEARNED_ROUNDING_FLOPS + 3 * ROUNDING_FLOPS)  # + two loss passes and freezing
    return [("layer forwards", forward), ("training steps (forward and backward of one batch)", training),
            ("learned rounding", float(rounding))]


def calibration_flops(facts: ModelFacts, calibration: Calibration | None, run: CalibrationRun | None,
                      quantizes: bool) -> tuple[tuple[str, float], ...]:
    """FLOPs of quantizing the model.

    Args:
        facts: the model's facts.
        calibration: what the method calibrates (None: calibration-free; only the rounding is counted).
        run: the calibration data (None: calibration-free).
        quantizes: the recipe quantizes (False: nothing is rounded).

    Returns:
        ``(what, FLOPs)`` pairs.
    """
    if calibration is not None and run is not None:
        match calibration:
            case Hessians():
                return tuple(_hessian_flops(facts, calibration, run))
            case ScaleSearch():
                return tuple(_scale_search_flops(facts, calibration, run))
            case ActivationRanges():
                return tuple(_activation_range_flops(facts, calibration, run))
            case BlockTraining():
                return tuple(_block_training_flops(facts, calibration, run))
    rounded = _quantized_weights(facts) if quantizes else 0
    return (("rounding", float(rounded * ROUNDING_FLOPS)),)
