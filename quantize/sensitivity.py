"""Per-module sensitivity: what quantizing one module alone, at one scheme, costs the model's output.

For every selected module (a Linear, or a layer's fused routed experts as one group) and every candidate
scheme, the module's weight is replaced in place by its round-to-nearest fake-quantized copy, the model
runs on a few calibration windows, and the mean per-token KL(original || perturbed) of the next-token
distributions is recorded; the weight is then restored. Sensitivities of this kind (the output change of
the whole model with one layer quantized) are what HAWQ-style and Neural Compressor-style mixed-precision
allocations rank layers by; here they are measured, not estimated from the weights.

Cost: ``modules x (candidates that quantize)`` forwards over the calibration windows, with the whole model
in memory, plus the reference log-probabilities: ``samples x seq_len x vocab`` fp32 values. The table
records its own wall time.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .cost import IntegerWeights
from .primitives import dequantize_weight, quantize_rtn
from .scheme import WeightScheme, scheme_or_keep_label
from .targets import TargetDecision


@dataclass(frozen=True)
class Candidate:
    """A scheme a module may get (``scheme=None``: kept in the model dtype)."""

    scheme: WeightScheme | None

    @property
    def label(self) -> str:
        return scheme_or_keep_label(self.scheme)


@dataclass
class ModuleSensitivity:
    """One module: its size under each candidate (bytes in the artifact) and the model's KL when it alone
    takes that candidate (0 for ``keep``)."""

    name: str
    kind: str  # "linear" | "experts"
    params: int
    bytes: dict[str, int] = field(default_factory=dict)  # candidate label -> bytes
    kl: dict[str, float] = field(default_factory=dict)  # candidate label -> mean KL (nats per token)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "params": self.params, "bytes": self.bytes, "kl": self.kl}


@dataclass
class SensitivityTable:
    """Every module's sensitivity, the candidates (by label) and how the table was measured."""

    candidates: dict[str, Candidate]
    modules: list[ModuleSensitivity]
    tokens: int
    seconds: float

    def to_dict(self) -> dict:
        return {"candidates": list(self.candidates), "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "modules": [m.to_dict() for m in self.modules]}


def _matrices(d: TargetDecision) -> list[tuple[int, int, int]]:
    """``(count, out, in)`` of the module's weight matrices."""
    if d.kind == "linear":
        out, inp = d.module.weight.shape
        return [(1, out, inp)]
    return [tuple(getattr(d.module, p).shape) for p in ("gate_up_proj", "down_proj")]


def candidate_bytes(d: TargetDecision, candidate: Candidate, dtype_bytes: int, quantized_experts: bool) -> int:
    """Bytes module ``d`` takes in the artifact under ``candidate`` (weights, scales, zero points; no bias)."""
    matrices = _matrices(d)
    if candidate.scheme is None:
        return sum(count * out * inp for count, out, inp in matrices) * dtype_bytes
    return IntegerWeights(candidate.scheme).module_bytes(matrices, d.kind == "experts", dtype_bytes, quantized_experts)


def _weights(d: TargetDecision) -> list[torch.Tensor]:
    return [d.module.weight] if d.kind == "linear" else [d.module.gate_up_proj, d.module.down_proj]


@contextmanager
def fake_quantized(d: TargetDecision, scheme: WeightScheme) -> Iterator[None]:
    """Within the block, module ``d``'s weights hold their round-to-nearest dequantized values under ``scheme``."""
    saved = [w.detach().clone() for w in _weights(d)]
    try:
        with torch.no_grad():
            for w in _weights(d):
                slices = [w] if w.dim() == 2 else list(w)  # fused experts [E, out, in]: one expert at a time
                for s in slices:
                    s.copy_(dequantize_weight(quantize_rtn(s, scheme), torch.float32).to(s.dtype))
        yield
    finally:
        with torch.no_grad():
            for w, original in zip(_weights(d), saved):
                w.copy_(original)


@torch.no_grad()
def _log_probs(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [F.log_softmax(model(input_ids=b).logits.float(), dim=-1) for b in batches]


@torch.no_grad()
def _mean_kl(model: nn.Module, batches: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Mean over tokens of KL(reference || model) in nats.

    Computed in fp64 with both distributions normalized there: a small perturbation (an int8 module of a tiny
    model) moves the KL by ~1e-8, below fp32's rounding of log-probabilities, where an fp32 sum can come out
    negative on one CPU and positive on another. Two normalized distributions have KL >= 0 (Gibbs).
    """
    total, tokens = 0.0, 0
    for b, ref in zip(batches, reference):
        ref64 = F.log_softmax(ref.double(), dim=-1)  # the stored fp32 log-probs, normalized again in fp64
        logq = F.log_softmax(model(input_ids=b).logits.double(), dim=-1)
        total += float((ref64.exp() * (ref64 - logq)).sum())
        tokens += ref.shape[0] * ref.shape[1]
    return total / tokens


def measure_sensitivity(
    model: nn.Module, decisions: list[TargetDecision], candidates: list[Candidate], calibration: torch.Tensor,
    *, batch_size: int = 4, dtype_bytes: int = 4, progress: bool = True,
) -> SensitivityTable:
    """The sensitivity of every quantized decision in ``decisions`` to every candidate.

    Args:
        model: the full-precision model (weights are perturbed one module at a time and restored).
        decisions: :func:`~.targets.select_targets` of the model; modules not selected are not measured.
        candidates: schemes (and ``keep``) each module may take.
        calibration: ``[samples, seq_len]`` token ids.
        batch_size: windows per forward.
        dtype_bytes: bytes per element of the model dtype (kept weights and scales).

    Returns:
        A :class:`SensitivityTable` (modules in model order).
    """
    started = time.perf_counter()
    model.eval()
    batches = list(calibration.split(batch_size))
    reference = _log_probs(model, batches)
    selected = [d for d in decisions if d.quantize]
    quantized_experts = any(d.kind == "experts" for d in selected)
    measured = [c for c in candidates if c.scheme is not None]
    bar = tqdm(total=len(selected) * len(measured), desc="sensitivity", unit="run", disable=not progress)
    modules = []
    for d in selected:
        m = ModuleSensitivity(d.name, d.kind, sum(p.numel() for p in d.module.parameters()))
        for c in candidates:
            m.bytes[c.label] = candidate_bytes(d, c, dtype_bytes, quantized_experts)
            if c.scheme is None:
                m.kl[c.label] = 0.0
                continue
            with fake_quantized(d, c.scheme):
                m.kl[c.label] = _mean_kl(model, batches, reference)
            bar.update()
        modules.append(m)
    bar.close()
    return SensitivityTable({c.label: c for c in candidates}, modules, int(calibration.numel()), time.perf_counter() - started)
