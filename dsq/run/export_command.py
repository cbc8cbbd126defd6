"""``dsq export``: an fp checkpoint or a dsq artifact to a validated ONNX export, with an optional report."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from dsq.core.atomic import claim_output
from dsq.core.errors import RecipeError
from dsq.core.manifest import EXPORT_MANIFEST, directory_files, extend_manifest
from dsq.core.schema import format_errors
from dsq.eval import Evaluator, Gates, write_report
from dsq.export import ExportResult
from dsq.quantize.model_dir import load_for_export
from dsq.run.export_step import export_and_evaluate, verify_export_source
from dsq.run.recipe import EvalSection, ExportSection, ExportValidationSection, SpeedSection
from dsq.run.steps import benchmark_suite
from dsq.run.tail import RunTail


@dataclass
class StandaloneExport:
    """What ``dsq export`` produced: the export, and a report (torch row vs ONNX row) if evaluated."""

    result: ExportResult
    report: object | None


def _export_section(*, tolerance: float | None, **options) -> ExportSection:
    """The export settings of ``dsq export``, checked by the recipe's own ``export:`` schema."""
    try:
        return ExportSection(validation=ExportValidationSection(tolerance=tolerance), **options)
    except ValidationError as exc:
        raise RecipeError(format_errors(exc, "dsq export options", ExportSection)) from None


def run_export(
    source: Path, output: Path, *, accuracy_level: int = 0, cpu_target: str = "portable", threads: int | None = None, tolerance: float | None = None,
    evaluate: bool = False, speed: bool = False, overwrite: bool = False, progress: bool = True,
    weight_op: str = "matmul_nbits", quantize_embeddings: bool = False, dense_experts: bool = False,
    absorb_mla: bool = True, moe_op: bool = True, opset: int = 23, int8_prefill: str | None = None,
) -> StandaloneExport:
    """``dsq export``: load ``source`` (fp checkpoint or dsq artifact), export to ``output``, validate.

    With ``evaluate`` the bundled benchmark suite runs on the torch model (the reference row) and on
    the ONNX model; the report goes to ``output/report.{json,md,html}`` and into the export's manifest.

    Raises:
        ArtifactIntegrityError: ``source`` is a dsq artifact whose manifest does not verify, or a
            compressed-tensors checkpoint without a manifest (checked before anything is loaded or written).
        CheckpointError: ``source`` cannot be loaded.
        ExportError: the export failed or does not match PyTorch.
    """
    verify_export_source(source, output)  # before anything is loaded or written
    with claim_output(output, overwrite, marker=EXPORT_MANIFEST):  # held from before the model is loaded
        section = _export_section(accuracy_level=accuracy_level, cpu_target=cpu_target, evaluate=evaluate, threads=threads, weight_op=weight_op,
                                  quantize_embeddings=quantize_embeddings, dense_experts=dense_experts,
                                  absorb_mla=absorb_mla, moe_op=moe_op, opset=opset, int8_prefill=int8_prefill,
                                  tolerance=tolerance)
        loaded = load_for_export(source)
        tail = torch_row = None
        if evaluate:
            suite = benchmark_suite(EvalSection(speed=SpeedSection() if speed else None))
            meta = {"model": str(source), "export": str(output), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            tail = RunTail(Evaluator(suite, loaded.tokenizer, progress=progress), Gates(), meta)
            torch_row = tail.evaluate(f"{source.name} (torch)", loaded.model, source, reference=True)
        name = source.name
        outcome = export_and_evaluate(
            loaded.model, loaded.tokenizer, output, section, evaluator=tail.evaluator if tail else None, name=name, torch_row=torch_row,
            source=loaded.source.to_dict(), overwrite=overwrite,
        )
        report = None
        if outcome.row is not None:
            report, _ = tail.conclude(torch_row, [outcome.row])
            exported = set(directory_files(output, exclude=EXPORT_MANIFEST))
            write_report(report, output)
            extend_manifest(output, sorted(set(directory_files(output, exclude=EXPORT_MANIFEST)) - exported))
        return StandaloneExport(outcome.result, report)
