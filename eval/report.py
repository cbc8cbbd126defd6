"""The evaluation report as one typed object, and its plain-data form (``report.json``).

A :class:`Report` holds the rows, the gate outcomes and the run facts of an evaluated run; a
:class:`NotEvaluatedReport` stands for a run whose models could not be evaluated on this machine.
:func:`dsq.eval.report_files.write_report` writes every file of either from memory.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from dsq.eval.facts import QuantizationFacts
from dsq.eval.gates import (
    GateResult,
    Gates,
    disk_size_ratio,
    mc_acc_delta_pts,
    mc_acc_norm_delta_pts,
    memory_size_ratio,
    ppl_increase_pct,
)
from dsq.eval.harness import ModelMetrics
from dsq.eval.memory import machine_info


@dataclass(frozen=True)
class Report:
    """Everything one evaluation run measured.

    Attributes:
        original: The original model's row.
        candidates: Compressed models' rows.
        gates: Gate outcomes (empty when no gate was set).
        meta: Free-form run facts (model id, recipe, date). A ``"machine"`` entry, if
            present, replaces the :func:`machine_info` of the machine writing the report.

    Example:
        >>> write_report(Report(original, [candidate], check_gates(gates, original, [candidate]), meta), out_dir)
    """

    original: ModelMetrics
    candidates: list[ModelMetrics]
    gates: list[GateResult]
    meta: dict

    @property
    def rows(self) -> tuple[ModelMetrics, ...]:
        """The original, then the candidates."""
        return (self.original, *self.candidates)

    @property
    def passed(self) -> bool:
        """Every gate passed (no gate: passed)."""
        return all(gate.passed for gate in self.gates)


@dataclass(frozen=True)
class NotEvaluatedReport:
    """A quantized artifact whose models could not be evaluated on this machine (a streamed
    checkpoint too large to load): its quantization facts, and every gate set failing as not evaluated.

    Attributes:
        candidate: The artifact's row name.
        reason: ``"not evaluated: ..."``, the sentence every gate's message carries.
        quantization: How the artifact was quantized.
        gates: Every gate set, failed with ``reason``.
        meta: Run facts (model, model type, streaming decision).
    """

    candidate: str
    reason: str
    quantization: QuantizationFacts
    gates: list[GateResult]
    meta: dict

    @classmethod
    def of(cls, candidate: str, why: str, gates: Gates, quantization: QuantizationFacts, meta: dict) -> NotEvaluatedReport:
        """The report of an artifact not evaluated because of ``why``; each gate of ``gates`` that is set fails.

        Args:
            candidate: The artifact's row name.
            why: Why it could not be evaluated here (e.g. the streaming decision's reason).
            gates: The run's gates.
            quantization: How the artifact was quantized.
            meta: Run facts.

        Returns:
            The report; its gates' values are NaN and their messages say that nothing was evaluated.
        """
        reason = f"not evaluated: {why}; run `dsq validate` on a machine where the model fits"
        results = [
            GateResult(gate=g, candidate=candidate, metric=g, value=float("nan"), threshold=float(t), passed=False,
                       message=f"{g}: {reason}")
            for g, t in gates.model_dump().items() if t is not None
        ]
        return cls(candidate, reason, quantization, results, meta)

    @property
    def passed(self) -> bool:
        """Every gate passed (only when no gate was set)."""
        return all(gate.passed for gate in self.gates)


# ----------------------------------------------------------------------------- how each metric is measured

_FIXED_METHODS = {
    "fidelity": (
        "the original and the candidate run on the same non-overlapping windows of the held-out text; "
        "top1 = fraction of positions with the same argmax next token; KL = "
        "sum_v p_orig(v) * (log p_orig(v) - log p_cand(v)) per position in nats (float32), mean and max"
    ),
    "weights_memory": (
        "bytes of all parameters and buffers (packed quantized weights included), shared tensors once; "
        "for ONNX rows the bytes of the graph and its external weight data"
    ),
    "weights_disk": (
        "bytes of the weight files (.safetensors; .onnx and .onnx.data for ONNX rows) in the saved artifact; "
        "artifact = all its files"
    ),
    "speed": (
        "tokens/s with a KV cache on a random prompt: prefill = batch x prompt tokens / seconds of one prompt "
        "pass from an empty cache; decode = batch x new tokens / seconds of the greedy single-token steps after "
        "it; median of the timed runs, same settings for torch and ONNX Runtime rows"
    ),
    "serving_memory": (
        "weights in memory + KV cache of one sequence (batch 1) at 4k, 32k and 128k tokens (whatever the model's "
        "window); KV bytes per token = layers x kv_heads x (k_dim + v_dim) x bytes (MLA: layers x (kv_lora_rank + "
        "qk_rope_head_dim) x bytes, plus DeepSeek-V3.2's indexer key in the model dtype); 1 byte per element for an "
        "int8/FP8 KV cache as a serving engine stores it (scales not counted), the model's dtype otherwise; dsq's "
        "torch forward simulates the quantized cache (quantize, dequantize at every cache update); ONNX rows keep an "
        "fp32 cache and are not listed"
    ),
    "size_ratio": "candidate weight bytes on disk / original weight bytes on disk",
    "peak_rss": (
        "peak resident set size of the whole process while the model was evaluated (kernel high-water "
        "mark reset before each model); includes every model still loaded"
    ),
    "peak_cuda": (
        "for a model on a CUDA device: torch.cuda.max_memory_allocated / max_memory_reserved of that device "
        "during its evaluation (peak statistics reset before each model); not measured on CPU"
    ),
    "weight_sqnr": (
        "per quantized module: 10 log10(|W|^2 / |W - dequant(Q(W))|^2) in dB, fp32, of the float weight it "
        "was quantized from (after AWQ / SmoothQuant folding) against the stored integers and scales; "
        "fused experts pool every expert's tensors, and each expert's own figure is the lower of its "
        "gate_up and down SQNRs; higher is better (about 6 dB per bit)"
    ),
}


def _methods(report: Report) -> dict[str, str]:
    """How each metric is measured, stated with this run's settings."""
    ppl = report.original.ppl
    ppl_setting = (
        f"windows of {ppl.context} tokens every {ppl.stride} tokens, {ppl.tokens} scored tokens"
        if ppl is not None
        else "not measured"
    )
    return {
        "perplexity": (
            f"exp of the mean next-token negative log-likelihood over the held-out text ({ppl_setting}); "
            "each window scores only the predictions the previous window did not, so every token but the "
            "first is scored exactly once, with at least context - stride tokens of left context"
        ),
        "multiple_choice": (
            f"{shots(report)} log-likelihood scoring as in lm-evaluation-harness: each choice's summed token "
            "log-probability given the context; acc = argmax of the sum, acc_norm = argmax of the sum "
            "divided by the choice's length in UTF-8 bytes; with k-shot, k other items (context + gold choice, "
            "drawn per item with a fixed seed) precede the context, which is cut from the left to fit the "
            "model's window (the choice never is)"
        ),
        **_FIXED_METHODS,
    }


def shots(report: Report) -> str:
    """``zero-shot`` or ``k-shot`` as the rows were measured (``2-shot/5-shot`` when they differ)."""
    ks = sorted({row.mc.num_fewshot for row in report.rows if row.mc is not None})
    return "zero-shot" if ks in ([], [0]) else "/".join(f"{k}-shot" for k in ks)


# ----------------------------------------------------------------------------- plain data


def _deltas(original: ModelMetrics, candidate: ModelMetrics) -> dict[str, float | None]:
    """Candidate-versus-original comparisons."""
    return {
        "ppl_increase_pct": ppl_increase_pct(original, candidate),
        "mc_acc_delta_pts": mc_acc_delta_pts(original, candidate),
        "mc_acc_norm_delta_pts": mc_acc_norm_delta_pts(original, candidate),
        "disk_size_ratio": disk_size_ratio(original, candidate),
        "memory_size_ratio": memory_size_ratio(original, candidate),
    }


def _finite_or_none(value: Any) -> Any:
    """Replace non-finite floats (NaN, inf) with ``None`` throughout, so the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def _evaluated_to_dict(report: Report) -> dict:
    meta = dict(report.meta)
    machine = meta.pop("machine", None) or machine_info()
    ppl = report.original.ppl
    candidates = [
        {**candidate.to_dict(), "deltas": _deltas(report.original, candidate)} for candidate in report.candidates
    ]
    return _finite_or_none(
        {
            "meta": meta,
            "machine": machine,
            "perplexity_settings": (
                {"context": ppl.context, "stride": ppl.stride, "tokens": ppl.tokens} if ppl is not None else None
            ),
            "methods": _methods(report),
            "original": report.original.to_dict(),
            "candidates": candidates,
            "gates": [asdict(gate) for gate in report.gates],
            "passed": report.passed,
        }
    )


def _not_evaluated_to_dict(report: NotEvaluatedReport) -> dict:
    return {
        "candidate": report.candidate,
        "evaluation": report.reason,
        "quantization": report.quantization.to_dict(),
        "gates": [{"gate": g.gate, "passed": g.passed, "message": g.message} for g in report.gates],
        "meta": report.meta,
    }


def report_to_dict(report: Report | NotEvaluatedReport) -> dict:
    """Plain-data form of a report (``report.json``).

    Args:
        report: The report.

    Returns:
        Of a :class:`Report`: ``meta``, ``machine``, ``perplexity_settings`` (context, stride,
        tokens), ``methods``, ``original`` (all metrics), ``candidates`` (all metrics plus
        ``deltas``: ppl increase %, accuracy deltas in points, size ratios), ``gates`` and
        ``passed`` (all gates passed); non-finite numbers become ``None``. Of a
        :class:`NotEvaluatedReport`: ``candidate``, ``evaluation`` (the reason), ``quantization``,
        ``gates`` (gate, passed, message) and ``meta``.
    """
    if isinstance(report, NotEvaluatedReport):
        return _not_evaluated_to_dict(report)
    return _evaluated_to_dict(report)
