"""Quality gates: thresholds a candidate must meet relative to the original model.

A gate whose metric was not measured fails and says so; a gate never passes silently.
Comparisons are written so that a NaN metric fails.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import Field, ValidationError

from dsq.core.errors import RecipeError
from dsq.eval.harness import ModelMetrics
from dsq.core.schema import Strict, format_errors


def _gate(needs: str | None, **bounds: float) -> Any:
    """A gate threshold: ``None`` (unchecked) or a finite number within ``bounds``.

    ``needs`` names the ``eval`` section whose measurement the gate reads (``None``: always measured).
    """
    return Field(None, json_schema_extra={"needs": needs}, **bounds)


class GatesSection(Strict):
    """Thresholds; a run whose artifact misses one exits 1 naming the metric.

    The one definition of the gates, their ranges and what each needs measured: recipes, the gates
    file of ``dsq validate`` and :class:`dsq.eval.Gates` all validate through it.
    """

    max_ppl_increase_pct: float | None = _gate("perplexity", gt=-100)  # % over the original (negative: must improve)
    max_ppl: float | None = _gate("perplexity", ge=1)  # a perplexity is at least 1
    min_mc_acc: float | None = _gate("multiple_choice", ge=0, le=1)  # fraction
    max_mc_acc_drop_pts: float | None = _gate("multiple_choice", ge=-100, le=100)  # percentage points
    min_top1_agreement: float | None = _gate("perplexity", ge=0, le=1)  # fraction; fidelity reads the held-out text
    max_mean_kl: float | None = _gate("perplexity", ge=0)  # nats
    max_size_ratio: float | None = _gate(None, gt=0)  # weight bytes on disk, candidate / original
    min_mc_recovery_pct: float | None = _gate("multiple_choice", gt=0)  # candidate accuracy in % of the original's
    min_prefill_speed_ratio: float | None = _gate("speed", gt=0)  # tokens/s, candidate / original
    min_decode_speed_ratio: float | None = _gate("speed", gt=0)

    @classmethod
    def needs(cls, gate: str) -> str | None:
        """The ``eval`` section (``perplexity``, ``multiple_choice``, ``speed``) gate ``gate`` reads, or ``None``."""
        extra = cls.model_fields[gate].json_schema_extra
        return extra.get("needs") if isinstance(extra, dict) else None


class Gates(GatesSection):
    """Thresholds; ``None`` leaves a gate unchecked.

    The fields, their ranges and the measurement each one needs are those of a recipe's
    ``eval.gates`` (:class:`GatesSection` above): one definition for recipes, the gates file
    of ``dsq validate`` and this class. A threshold out of its range (or NaN/inf) is a
    :class:`RecipeError` naming the gate.

    Attributes:
        max_ppl_increase_pct: Largest allowed perplexity increase over the original, in %
            (> -100; negative: the candidate must improve).
        max_ppl: Largest allowed perplexity (>= 1).
        min_mc_acc: Smallest allowed multiple-choice accuracy, as a fraction (0..1).
        max_mc_acc_drop_pts: Largest allowed accuracy drop below the original, in
            percentage points (-100..100).
        min_top1_agreement: Smallest allowed top-1 agreement with the original (0..1).
        max_mean_kl: Largest allowed mean KL(original || candidate), in nats (>= 0).
        max_size_ratio: Largest allowed ratio of weight bytes on disk, candidate / original (> 0).
        min_mc_recovery_pct: Smallest allowed multiple-choice accuracy as a % of the original's
            (the "recovery" of llm-compressor's model cards: 100 = no loss; > 0).
        min_prefill_speed_ratio / min_decode_speed_ratio: Smallest allowed tokens/s, candidate /
            original (> 0; needs ``eval.speed``).

    Example:
        >>> Gates(max_ppl_increase_pct=2.0, min_top1_agreement=0.9)
    """

    def __init__(self, **thresholds: float | None) -> None:
        try:
            super().__init__(**thresholds)
        except ValidationError as exc:
            raise RecipeError(format_errors(exc, "gates", GatesSection)) from None


@dataclass(frozen=True)
class GateResult:
    """Outcome of one gate for one candidate.

    Attributes:
        gate: Gate name (a :class:`Gates` field).
        candidate: Candidate row name.
        metric: Name of the checked metric.
        value: Measured value (NaN when not measured).
        threshold: The gate's threshold.
        passed: Whether the candidate meets the gate.
        message: One-line explanation.
    """

    gate: str
    candidate: str
    metric: str
    value: float
    threshold: float
    passed: bool
    message: str


def ppl_increase_pct(original: ModelMetrics, candidate: ModelMetrics) -> float | None:
    """Perplexity increase of ``candidate`` over ``original`` in %, or ``None`` if unmeasured."""
    if original.ppl is None or candidate.ppl is None:
        return None
    return (candidate.ppl.ppl / original.ppl.ppl - 1.0) * 100.0


def mc_acc_delta_pts(original: ModelMetrics, candidate: ModelMetrics) -> float | None:
    """Accuracy of ``candidate`` minus ``original`` in percentage points (negative: worse)."""
    if original.mc is None or candidate.mc is None:
        return None
    return (candidate.mc.acc - original.mc.acc) * 100.0


def mc_acc_norm_delta_pts(original: ModelMetrics, candidate: ModelMetrics) -> float | None:
    """Normalized accuracy of ``candidate`` minus ``original`` in percentage points."""
    if original.mc is None or candidate.mc is None:
        return None
    return (candidate.mc.acc_norm - original.mc.acc_norm) * 100.0


def _ratio(numerator: int | None, denominator: int | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def disk_size_ratio(original: ModelMetrics, candidate: ModelMetrics) -> float | None:
    """Weight bytes on disk, candidate / original, or ``None`` if either is unmeasured."""
    return _ratio(candidate.weight_bytes_disk, original.weight_bytes_disk)


def memory_size_ratio(original: ModelMetrics, candidate: ModelMetrics) -> float | None:
    """Weight bytes in memory, candidate / original."""
    return _ratio(candidate.weight_bytes_memory, original.weight_bytes_memory)


def _ppl(original: ModelMetrics, candidate: ModelMetrics) -> float | None:
    return candidate.ppl.ppl if candidate.ppl is not None else None


def _mc_acc(original: ModelMetrics, candidate: ModelMetrics) -> float | None:
    return candidate.mc.acc if candidate.mc is not None else None


def _mc_acc_drop(original: ModelMetrics, candidate: ModelMetrics) -> float | None:
    delta = mc_acc_delta_pts(original, candidate)
    return -delta if delta is not None else None


def _top1(original: ModelMetrics, candidate: ModelMetrics) -> float | None:
    return candidate.fidelity.top1_agreement if candidate.fidelity is not None else None


def _mean_kl(original: ModelMetrics, candidate: ModelMetrics) -> float | None:
    return candidate.fidelity.mean_kl if candidate.fidelity is not None else None


def mc_recovery_pct(original: ModelMetrics, candidate: ModelMetrics) -> float | None:
    """Candidate multiple-choice accuracy as a percentage of the original's."""
    if original.mc is None or candidate.mc is None or not original.mc.acc:
        return None
    return 100.0 * candidate.mc.acc / original.mc.acc


def _speed_ratio(attr: str) -> Callable[[ModelMetrics, ModelMetrics], float | None]:
    def measure(original: ModelMetrics, candidate: ModelMetrics) -> float | None:
        if original.speed is None or candidate.speed is None:
            return None
        return getattr(candidate.speed, attr) / getattr(original.speed, attr)

    return measure


@dataclass(frozen=True)
class _GateSpec:
    """How one gate is measured: metric name, measurement, bound direction, what it needs."""

    metric: str
    measure: Callable[[ModelMetrics, ModelMetrics], float | None]
    is_upper_bound: bool
    needs: str


_SPECS: dict[str, _GateSpec] = {
    "max_ppl_increase_pct": _GateSpec(
        "ppl_increase_pct", ppl_increase_pct, True, "perplexity of the original and the candidate"
    ),
    "max_ppl": _GateSpec("ppl", _ppl, True, "perplexity of the candidate"),
    "min_mc_acc": _GateSpec("mc_acc", _mc_acc, False, "multiple-choice accuracy of the candidate"),
    "max_mc_acc_drop_pts": _GateSpec(
        "mc_acc_drop_pts", _mc_acc_drop, True, "multiple-choice accuracy of the original and the candidate"
    ),
    "min_top1_agreement": _GateSpec(
        "top1_agreement", _top1, False, "fidelity to the original (evaluate the original first, with text data)"
    ),
    "max_mean_kl": _GateSpec(
        "mean_kl", _mean_kl, True, "fidelity to the original (evaluate the original first, with text data)"
    ),
    "max_size_ratio": _GateSpec(
        "size_ratio", disk_size_ratio, True, "weight bytes on disk of the original and the candidate"
    ),
    "min_mc_recovery_pct": _GateSpec(
        "mc_recovery_pct", mc_recovery_pct, False, "multiple-choice accuracy of the original and the candidate"
    ),
    "min_prefill_speed_ratio": _GateSpec(
        "prefill_speed_ratio", _speed_ratio("prefill_tokens_per_s"), False, "eval.speed on the original and the candidate"
    ),
    "min_decode_speed_ratio": _GateSpec(
        "decode_speed_ratio", _speed_ratio("decode_tokens_per_s"), False, "eval.speed on the original and the candidate"
    ),
}


def _check(gate: str, spec: _GateSpec, threshold: float, original: ModelMetrics, candidate: ModelMetrics) -> GateResult:
    """Evaluate one gate on one candidate."""
    value = spec.measure(original, candidate)
    if value is None:
        return GateResult(
            gate=gate,
            candidate=candidate.name,
            metric=spec.metric,
            value=math.nan,
            threshold=threshold,
            passed=False,
            message=f"{candidate.name}: {gate} failed: {spec.metric} was not measured (needs {spec.needs})",
        )
    passed = value <= threshold if spec.is_upper_bound else value >= threshold
    relation = "<=" if spec.is_upper_bound else ">="
    verdict = "passed" if passed else "failed"
    return GateResult(
        gate=gate,
        candidate=candidate.name,
        metric=spec.metric,
        value=float(value),
        threshold=float(threshold),
        passed=passed,
        message=f"{candidate.name}: {gate} {verdict}: {spec.metric} = {value:.4g} (required {relation} {threshold:g})",
    )


def check_gates(gates: Gates, original: ModelMetrics, candidates: list[ModelMetrics]) -> list[GateResult]:
    """Check every set gate on every candidate.

    Args:
        gates: Thresholds (``None`` fields are skipped).
        original: The original model's row.
        candidates: Candidate rows.

    Returns:
        One result per (candidate, set gate), candidates in order, gates in field order.
    """
    results: list[GateResult] = []
    for candidate in candidates:
        for gate in type(gates).model_fields:
            threshold = getattr(gates, gate)
            if threshold is not None:
                results.append(_check(gate, _SPECS[gate], threshold, original, candidate))
    return results
