"""The one tail of every run: reload check, evaluation rows, gates, the report and its files, the manifest.

In-memory and streamed PTQ, QAT, LoRA, ``dsq export --evaluate`` and ``dsq validate`` all end
here: they evaluate their rows with one :class:`RunTail`, conclude (gates and the report, built once
in memory) and write the report's files once.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from dsq.core.errors import QuantizationError
from dsq.core.manifest import write_manifest
from dsq.eval import (
    Evaluator, GateResult, Gates, ModelMetrics, QuantizationFacts, ReloadCheck, Report, check_gates, transformers_reload_check,
    write_report,
)


@dataclass(frozen=True)
class ReloadSettings:
    """How transformers reloads an artifact for the reload check."""

    dtype: torch.dtype
    trust_remote_code: bool = False


@dataclass
class RunTail:
    """The end of a run.

    Attributes:
        evaluator: Runs the benchmark suite on a model (None on non-main processes of a training run).
        gates: The thresholds the gated rows must meet.
        meta: The report's ``meta`` (model, recipe, date ...).
        reload: How the artifact is reloaded for the reload check (None: no reload check).
    """

    evaluator: Evaluator | None
    gates: Gates
    meta: dict = field(default_factory=dict)
    reload: ReloadSettings | None = None

    def reload_check(self, root: Path, model: nn.Module, tolerance: float) -> ReloadCheck | None:
        """transformers reloads the artifact at ``root`` and must agree with ``model``; a loaded mismatch fails the run."""
        if self.reload is None:
            return None
        check = transformers_reload_check(
            root, model, dtype=self.reload.dtype, trust_remote_code=self.reload.trust_remote_code, tolerance=tolerance,
        )
        if check.loaded and not check.passed:
            raise QuantizationError(
                f"transformers reloads the artifact with logits differing by {check.max_abs_diff:.3g} "
                f"(tolerance {check.tolerance:g}); the artifact does not match dsq's model"
            )
        return check

    def evaluate(self, name: str, model, disk_path: Path | None = None, *, reference: bool = False, **facts) -> ModelMetrics:
        """One report row: the benchmark suite on ``model``, with the stage ``facts`` it carries."""
        metrics = self.evaluator.evaluate(name, model, reference=reference, disk_path=disk_path)
        return replace(metrics, **facts) if facts else metrics

    def conclude(self, original: ModelMetrics, rows: list[ModelMetrics],
                 gated: list[ModelMetrics] | None = None) -> tuple[Report, list[GateResult]]:
        """Gates on ``gated`` (default: every row) and the report, built once."""
        results = check_gates(self.gates, original, rows if gated is None else gated)
        return Report(original, rows, results, meta=self.meta), results


def write_artifact_records(report: Report, root: Path, source: dict, manifest_extra: dict) -> None:
    """A run's report files, written once, then the manifest over the whole artifact."""
    write_report(report, root)
    write_manifest(root, source=source, extra=manifest_extra)


@dataclass
class RunResult:
    """What a run produced."""

    output: Path
    report: Report | None  # None: a streamed run too large to evaluate on this machine
    gates: list[GateResult] = field(default_factory=list)
    reload: ReloadCheck | None = None
    quantization: QuantizationFacts | None = None  # how the artifact was quantized, when there is no report

    @property
    def gates_passed(self) -> bool:
        return all(g.passed for g in self.gates)
