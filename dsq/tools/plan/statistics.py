"""What quantizing one decoder layer holds besides its weights: calibration statistics (or learned rounding's
training state), activations, forward workspace and rounding temporaries, from the method's
:class:`~dsq.quantize.cost.MethodCost`."""
from __future__ import annotations

import math
from dataclasses import dataclass

from dsq.quantize.cost import (
    BLOCK_ACTIVATION_BYTES,
    BLOCK_TRAINING_HELD_BYTES,
    BLOCK_TRAINING_PEAK_BYTES,
    HEAD_LOGIT_COPIES,
    CHANNEL_VECTOR_BYTES,
    RTN_TEMPORARY_BYTES,
    STATISTICS_BYTES,
    SUM_BYTES,
    ActivationRanges,
    ArtifactLayout,
    BlockTraining,
    Calibration,
    Hessians,
    Rounding,
    ScaleSearch,
)

from .facts import ModelFacts, Target


@dataclass(frozen=True)
class CalibrationRun:
    """The calibration data a method runs on: ``samples`` sequences of ``seq_len`` tokens, in batches."""

    samples: int
    seq_len: int
    batch_size: int

    @property
    def tokens(self) -> int:
        return self.samples * self.seq_len

    @property
    def batches(self) -> int:
        return math.ceil(self.samples / self.batch_size)

    @property
    def batch_tokens(self) -> int:
        return min(self.batch_size, self.samples) * self.seq_len


def _solve_shapes(target: Target) -> tuple[tuple[int, int, int], ...]:
    """(how many, out, K) of the weights GPTQ solves: each expert's fused gate_up ``[2I, H]`` and down."""
    if not target.experts:
        m = target.matrices[0]
        return ((1, m.out, m.inp),)
    gate, _, down = target.matrices
    return ((gate.count, 2 * gate.out, gate.inp), (down.count, down.out, down.inp))


def _hessian_bytes(facts: ModelFacts, targets: list[Target], method: Hessians) -> int:
    """Hessians of GPTQ's larger stage (attention, then MLP/experts) plus the largest batched solve's working set."""
    stages = ([t for t in targets if t.attention], [t for t in targets if not t.attention])
    peak = 0
    for stage in stages:
        quantized = [t for t in stage if t.quantize]
        keys = [(n, k) for t in quantized for n, k in t.hessian_dims]
        if any(t.experts for t in quantized):
            keys.append((1, facts.hidden))  # the experts' shared input
        peak = max(peak, sum(n * (SUM_BYTES * k * k + CHANNEL_VECTOR_BYTES * k) for n, k in keys))  # fp64 H [K, K] + two [K] vectors
    solve = max((_largest_solve(method, [t for t in stage if t.quantize]) for stage in stages), default=0)
    return peak + solve


def _largest_solve(method: Hessians, quantized: list[Target]) -> int:
    """Working set of the largest batched solve of one stage: weights of one shape are solved together
    (the experts of a projection, same-shape Linears such as gate_proj and up_proj)."""
    counts: dict[tuple[int, int], int] = {}
    for t in quantized:
        for count, out, k in _solve_shapes(t):
            counts[out, k] = counts.get((out, k), 0) + count
    return max((method.solve_bytes(count, out, k) for (out, k), count in counts.items()), default=0)


def _observed_keys(targets: list[Target]) -> list[tuple[int, int]]:
    """(how many, width) of the inputs AWQ/SmoothQuant observe: every Linear, every expert's inputs."""
    keys = [(1, t.matrices[0].inp) for t in targets if not t.experts]
    for t in targets:
        if t.experts:
            count, inter, hidden = t.matrices[0].count, t.matrices[0].out, t.matrices[0].inp
            keys += [(1, hidden), (count, hidden), (count, inter)]
    return keys


def _scale_search_bytes(facts: ModelFacts, targets: list[Target], method: ScaleSearch, run: CalibrationRun,
                        act_bytes: int) -> int:
    """Channel vectors and sampled rows per observed input, plus the block inputs the search replays."""
    rows_per_call = math.ceil(method.search_tokens / run.batches)
    rows = run.batches * min(rows_per_call, run.batch_tokens)
    collector = sum(n * k * (CHANNEL_VECTOR_BYTES + STATISTICS_BYTES * rows) for n, k in _observed_keys(targets))
    calls = min(math.ceil(method.search_tokens / run.batch_tokens), run.batches)
    replay = calls * run.batch_tokens * facts.residual_width * (2 * act_bytes + STATISTICS_BYTES)
    return collector * (2 if method.clip else 1) + replay


def _linear_widths(facts: ModelFacts, targets: list[Target]) -> int:
    """Elements of the inputs and outputs of a layer's Linears per token, routed experts ``top_k`` times."""
    widths = 0
    for t in targets:
        per_token = sum(m.out + m.inp for m in t.matrices)  # experts: gate [I, H], up [I, H], down [H, I]
        widths += min(facts.top_k, t.matrices[0].count) * per_token if t.experts else per_token
    return widths


def _training_bytes(weights: int, activations: float, dtype_bytes: int) -> float:
    """Learned rounding of ``weights`` elements: the weights-only peak, or the start of the backward pass
    with ``activations`` bytes saved, whichever is larger."""
    held = BLOCK_TRAINING_HELD_BYTES[dtype_bytes] * weights + activations
    return max(BLOCK_TRAINING_PEAK_BYTES[dtype_bytes] * weights, held)


def _block_training_bytes(facts: ModelFacts, targets: list[Target], run: CalibrationRun, dtype_bytes: int) -> int:
    """A decoder block trained on one batch: every quantized weight's rounding state, the batch's activations."""
    weights = sum(t.weight_params for t in targets if t.quantize)
    if not weights:
        return 0
    activations = BLOCK_ACTIVATION_BYTES[dtype_bytes] * _linear_widths(facts, targets) * run.batch_tokens
    return int(_training_bytes(weights, activations, dtype_bytes))


def _head_training_bytes(targets: list[Target], run: CalibrationRun, dtype_bytes: int) -> int:
    """Linears outside the layers (``lm_head``), each trained alone: its rounding state, a copy of its weight
    (the target's) and fp32 logits of one batch."""
    peak = 0
    for t in targets:
        if not t.quantize:
            continue
        weights, out = t.weight_params, t.matrices[0].out
        logits = HEAD_LOGIT_COPIES * STATISTICS_BYTES * out * run.batch_tokens
        peak = max(peak, int(_training_bytes(weights, logits, dtype_bytes)) + dtype_bytes * weights)
    return peak


def statistics_bytes(facts: ModelFacts, index: int | None, calibration: Calibration | None, run: CalibrationRun | None,
                     act_bytes: int) -> int:
    """Peak calibration statistics a method holds for one layer (or the head stage for None); for learned
    rounding, the training state of the layer's weights and one batch's saved activations (its targets are
    part of :func:`activation_bytes`).

    Args:
        facts: the model's facts.
        index: decoder layer (None: modules outside the layers, e.g. lm_head).
        calibration: what the method calibrates (None: nothing).
        run: the calibration data (None: calibration-free).
        act_bytes: bytes per activation element (the recipe dtype).

    Returns:
        Bytes.
    """
    if calibration is None or run is None:
        return 0
    targets = facts.layer_targets(index)
    match calibration:
        case Hessians():
            return _hessian_bytes(facts, targets, calibration)
        case ScaleSearch():
            return _scale_search_bytes(facts, targets, calibration, run, act_bytes)
        case ActivationRanges():
            return sum(n * CHANNEL_VECTOR_BYTES * k for n, k in _observed_keys(targets))  # two [K] vectors each
        case BlockTraining():
            if index is None:
                return _head_training_bytes(targets, run, act_bytes)
            return _block_training_bytes(facts, targets, run, act_bytes)
    raise TypeError(f"no statistics model for {type(calibration).__name__}")


def hidden_copies(calibration: Calibration | None) -> int:
    """Hidden-state tensors per calibration sequence held at a layer: its inputs and outputs; learned rounding
    also keeps the block's full-precision outputs (its targets, the next block's full-precision inputs)."""
    match calibration:
        case BlockTraining():
            return 3
    return 2


def activation_bytes(facts: ModelFacts, run: CalibrationRun | None, act_bytes: int, calibration: Calibration | None) -> int:
    """A layer's calibration hidden states: :func:`hidden_copies` x samples x seq_len x
    :attr:`~.facts.ModelFacts.residual_width` (hidden, times DeepSeek-V4's hyper-connection streams)."""
    if run is None:
        return 0
    return hidden_copies(calibration) * run.tokens * facts.residual_width * act_bytes


def _score_elements(facts: ModelFacts, seq_len: int) -> int:
    """Attention scores per query of the widest layer: every head over its keys (DeepSeek-V4: the sequence
    plus its compressed entries), plus its indexer's scores (one per head and scored key)."""
    widest = 0
    for layer in facts.layers:
        scores = facts.heads * layer.keys(seq_len)
        if layer.indexer is not None:
            scores += layer.indexer.heads * (seq_len // layer.indexer.rate)
        widest = max(widest, scores)
    return widest


def workspace_bytes(facts: ModelFacts, run: CalibrationRun | None, act_bytes: int) -> int:
    """Transients of one calibration batch: fp32 attention probabilities and the widest MLP activation.

    Calibration runs without a KV cache (``use_cache=False``): the attention of one batch scores its own
    tokens (and, in DeepSeek-V4, the compressed entries it derives from them), and nothing persists."""
    if run is None:
        return 0
    widest = max((layer.intermediate for layer in facts.layers), default=0)
    return run.batch_tokens * (_score_elements(facts, run.seq_len) * STATISTICS_BYTES + 2 * widest * act_bytes)


def temporary_bytes(facts: ModelFacts, index: int | None, layout: ArtifactLayout | None, rounding: Rounding | None,
                    dtype_bytes: int) -> int:
    """Transient memory of quantizing the largest tensor of one layer (or of the head stage for None).

    A 2-D tensor costs :data:`~dsq.quantize.cost.RTN_TEMPORARY_BYTES` per element. Fused experts
    ``[E, 2I, H]`` are gathered into one integer tensor and packed (``rounding``: with or without one
    expert's rounding temporaries alive). The module's packed output is not included: it is part of
    the quantized model.

    Args:
        facts: the model's facts.
        index: decoder layer (None: modules outside the layers, e.g. lm_head).
        layout: the method's artifact layout (None: no quantization).
        rounding: how the method rounds fused experts (None: no quantization).
        dtype_bytes: bytes per element of the recipe dtype.

    Returns:
        Bytes.
    """
    if layout is None or rounding is None:
        return 0
    peak = 0.0
    for t in facts.layer_targets(index):
        if not t.quantize or layout.module_bytes(t.shapes, t.experts, dtype_bytes, facts.has_quantized_experts) is None:
            continue
        if t.experts:
            gate = t.matrices[0]
            one_expert = 2 * gate.out * gate.inp  # gate_up of one expert [2I, H]
            rounding_one = one_expert * RTN_TEMPORARY_BYTES if rounding.one_expert_temporaries else 0.0
            peak = max(peak, rounding_one + gate.count * one_expert * rounding.expert_integer_bytes[layout.bits])
        else:
            peak = max(peak, t.weight_params * RTN_TEMPORARY_BYTES)
    return int(peak)
