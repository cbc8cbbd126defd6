"""The export stage at the pipeline's edge: recipe ``export:`` section and ``dsq export`` -> ONNX + report row."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dsq.core.atomic import MANIFEST, claim_output
from dsq.core.loading import LoadedModel, load_checkpoint
from dsq.core.errors import CheckpointError, RecipeError
from dsq.quantize.artifact_load import load_artifact
from dsq.core.manifest import EXPORT_MANIFEST, ArtifactIntegrityError, directory_files, extend_manifest, verify_manifest
from dsq.run.recipe import ExportSection
from dsq.eval import Evaluator, ModelMetrics
from dsq.export import (
    DequantizeLinearWeights, ExportConfig, ExportResult, MatMulNBitsWeights, OrtCausalLM, ValidationConfig, export_onnx,
)


def export_config(section: ExportSection) -> ExportConfig:
    v = section.validation
    validation = ValidationConfig(
        batch_sizes=tuple(v.batch_sizes), seq_lens=tuple(v.seq_lens), decode_steps=v.decode_steps,
        greedy_tokens=v.greedy_tokens, tolerance=v.tolerance,
    )
    weights = DequantizeLinearWeights() if section.weight_op == "dequantize_linear" else MatMulNBitsWeights()
    return ExportConfig(accuracy_level=section.accuracy_level, validation=validation, threads=section.threads,
                        weights=weights, quantize_embeddings=section.quantize_embeddings)


def export_summary(result: ExportResult) -> dict:
    """The facts of an export a report row carries."""
    v = result.validation
    return {
        "path": str(result.path),
        "accuracy_level": result.accuracy_level,
        "weight_op": result.weight_op,
        "embedding": result.plan.embedding,
        "max_abs_logit_diff": v.max_abs_diff,
        "tolerance": v.tolerance,
        "greedy_tokens_equal": v.greedy_equal,
        "greedy_tie_margins": [c.tie_margin for c in v.cases if c.tie_margin is not None],
        "matmul_nbits": result.ops.get("com.microsoft::MatMulNBits", 0),
        "int8_matmul": result.ops.get("MatMulInteger", 0),
        "experts_in_graph": sum(result.plan.experts.values()),
        "onnx_bytes": result.onnx_bytes,
        "seconds": round(result.seconds, 2),
    }


@dataclass
class ExportOutcome:
    result: ExportResult
    row: ModelMetrics | None


def export_and_evaluate(
    model: torch.nn.Module, tokenizer, directory: Path, section: ExportSection, *,
    evaluator: Evaluator | None, name: str, torch_row: ModelMetrics | None, source: dict | None = None,
    overwrite: bool = False,
) -> ExportOutcome:
    """Export ``model`` to ``directory`` and (if asked) evaluate the ONNX model as row ``<name>-onnx``.

    The row's ``extra["onnx"]`` holds the export's validation figures and, when ``torch_row`` is given,
    the perplexity of ONNX Runtime relative to torch's for the same model (``ppl_vs_torch_pct``).

    Raises:
        ExportError: the export failed or does not match PyTorch (nothing is left at ``directory``).
    """
    config = export_config(section)
    result = export_onnx(model, tokenizer, directory, config, source=source, overwrite=overwrite)
    row = None
    if section.evaluate and evaluator is not None:
        ort_lm = OrtCausalLM(result.path, threads=section.threads)
        row = evaluator.evaluate(f"{name}-onnx", ort_lm, disk_path=result.path)
        facts = export_summary(result)
        if torch_row is not None and torch_row.ppl is not None and row.ppl is not None:
            facts["ppl_vs_torch_pct"] = 100.0 * (row.ppl.ppl / torch_row.ppl.ppl - 1.0)
        row.extra["onnx"] = facts
    return ExportOutcome(result, row)


def _quantization_config(path: Path) -> dict | None:
    """``config.json``'s ``quantization_config`` (None for an fp checkpoint).

    Raises:
        CheckpointError: no readable ``config.json`` object, or a ``quantization_config`` that is not an object.
    """
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json; not a model directory")
    try:
        config = json.loads(config_file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file}: not valid UTF-8 JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: not a JSON object")
    qconfig = config.get("quantization_config")
    if qconfig is not None and not isinstance(qconfig, dict):
        raise CheckpointError(f"{config_file}: quantization_config must be an object, got {type(qconfig).__name__}")
    return qconfig or None


def verify_export_source(path: Path, output: Path) -> None:
    """What ``dsq export`` accepts: a dsq artifact whose manifest verifies, or an fp checkpoint.

    A directory with ``manifest.json`` is verified (:func:`dsq.core.manifest.verify_manifest`), and ``output``
    may not lie inside it (the artifact would no longer match its manifest). Without a manifest,
    a compressed-tensors ``quantization_config`` is refused: dsq's artifacts always carry a manifest, so
    such a directory was not written by dsq or lost its manifest. Other quantization methods are left to
    :func:`load_for_export`, which names the ones that have no ONNX form.

    Raises:
        ArtifactIntegrityError: the manifest does not verify, ``output`` is inside the artifact, or a
            compressed-tensors checkpoint has no manifest.
        CheckpointError: no readable ``config.json``.
    """
    if (path / MANIFEST).exists() or (path / MANIFEST).is_symlink():
        verify_manifest(path)
        if output.resolve().is_relative_to(path.resolve()):
            raise ArtifactIntegrityError(
                f"output {output} is inside the artifact {path}, which would then no longer match its {MANIFEST}; "
                "export beside it (the default is ARTIFACT-onnx)"
            )
        return
    qconfig = _quantization_config(path)
    if qconfig is not None and qconfig.get("quant_method") == "compressed-tensors":
        raise ArtifactIntegrityError(
            f"{path}: config.json has a compressed-tensors quantization_config but there is no {MANIFEST}; "
            "dsq exports its own artifacts (whose manifest verifies) and fp checkpoints"
        )


def load_for_export(path: Path) -> LoadedModel:
    """An fp checkpoint (transformers) or a dsq compressed-tensors artifact (dsq's own modules).

    Raises:
        CheckpointError: no readable ``config.json``, a quantization method dsq cannot read, or an
            artifact that does not load (see :func:`dsq.quantize.artifact_load.load_artifact`).
    """
    qconfig = _quantization_config(path)
    if qconfig is None:
        return load_checkpoint(path)
    config_file = path / "config.json"
    method = qconfig.get("quant_method")
    if method != "compressed-tensors":
        raise CheckpointError(
            f"{config_file}: quantization_config.quant_method {method!r} has no ONNX form; "
            "dsq exports fp checkpoints and dsq (compressed-tensors) artifacts"
        )
    return load_artifact(path)


@dataclass
class StandaloneExport:
    """What ``dsq export`` produced: the export, and a report (torch row vs ONNX row) if evaluated."""

    result: ExportResult
    report: object | None


def _export_section(*, tolerance: float | None, **options) -> ExportSection:
    """The export settings of ``dsq export``, checked by the recipe's own ``export:`` schema."""
    from pydantic import ValidationError

    from dsq.run.recipe import ExportValidationSection, format_errors

    try:
        return ExportSection(validation=ExportValidationSection(tolerance=tolerance), **options)
    except ValidationError as exc:
        raise RecipeError(format_errors(exc, "dsq export options", ExportSection)) from None


def run_export(
    source: Path, output: Path, *, accuracy_level: int = 0, threads: int | None = None, tolerance: float | None = None,
    evaluate: bool = False, speed: bool = False, overwrite: bool = False, progress: bool = True,
    weight_op: str = "matmul_nbits", quantize_embeddings: bool = False,
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
    import time

    from dsq.eval import Report, write_report

    from dsq.run.pipeline import benchmark_suite
    from dsq.run.recipe import Recipe

    verify_export_source(source, output)  # before anything is loaded or written
    with claim_output(output, overwrite, marker=EXPORT_MANIFEST):  # held from before the model is loaded
        section = _export_section(accuracy_level=accuracy_level, evaluate=evaluate, threads=threads, weight_op=weight_op,
                                  quantize_embeddings=quantize_embeddings, tolerance=tolerance)
        loaded = load_for_export(source)
        evaluator = torch_row = None
        if evaluate:
            recipe = Recipe.model_validate({"eval": {"speed": {} if speed else None}})
            evaluator = Evaluator(benchmark_suite(recipe), loaded.tokenizer, progress=progress)
            torch_row = evaluator.evaluate(f"{source.name} (torch)", loaded.model, reference=True, disk_path=source)
        name = source.name
        outcome = export_and_evaluate(
            loaded.model, loaded.tokenizer, output, section, evaluator=evaluator, name=name, torch_row=torch_row,
            source=loaded.source.to_dict(), overwrite=overwrite,
        )
        report = None
        if outcome.row is not None:
            meta = {"model": str(source), "export": str(output), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            report = Report(torch_row, [outcome.row], [], meta=meta)
            exported = set(directory_files(output, exclude=EXPORT_MANIFEST))
            write_report(report, output)
            extend_manifest(output, sorted(set(directory_files(output, exclude=EXPORT_MANIFEST)) - exported))
        return StandaloneExport(outcome.result, report)
