"""The export stage at the pipeline's edge: recipe ``export:`` section and ``dsq export`` -> ONNX + report row."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dsq.core.atomic import MANIFEST
from dsq.core.loading import LoadedModel
from dsq.quantize.model_dir import _quantization_config
from dsq.core.manifest import ArtifactIntegrityError, verify_manifest
from dsq.run.recipe import ExportSection
from dsq.eval import Evaluator, ModelMetrics, OnnxFacts
from dsq.quantize.w8a8 import DynamicPerTensor, DynamicPerToken
from dsq.eval.gates import ppl_increase_pct
from dsq.export import (
    DequantizeLinearWeights, ExportConfig, ExportResult, MatMulNBitsWeights, OrtCausalLM, ValidationConfig, cpu_target,
    export_onnx,
)


PROMPT_ACTIVATIONS = {"dynamic": DynamicPerToken(), "dynamic_tensor": DynamicPerTensor()}  # export.int8_prefill


def export_config(section: ExportSection) -> ExportConfig:
    v = section.validation
    validation = ValidationConfig(
        batch_sizes=tuple(v.batch_sizes), seq_lens=tuple(v.seq_lens), decode_steps=v.decode_steps,
        greedy_tokens=v.greedy_tokens, tolerance=v.tolerance,
    )
    weights = DequantizeLinearWeights() if section.weight_op == "dequantize_linear" else MatMulNBitsWeights()
    return ExportConfig(accuracy_level=section.accuracy_level, cpu_target=cpu_target(section.cpu_target),
                        validation=validation, threads=section.threads,
                        weights=weights, quantize_embeddings=section.quantize_embeddings, dense_experts=section.dense_experts,
                        absorb_mla=section.absorb_mla, moe_op=section.moe_op, opset=section.opset,
                        int8_prefill=PROMPT_ACTIVATIONS[section.int8_prefill] if section.int8_prefill else None)


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

    The row's ``onnx`` facts hold the export's validation figures and, when ``torch_row`` is given,
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
        vs_torch = ppl_increase_pct(torch_row, row) if torch_row is not None else None
        row = replace(row, onnx=OnnxFacts.of(result, vs_torch))
    return ExportOutcome(result, row)


def verify_export_source(path: Path, output: Path) -> None:
    """What ``dsq export`` accepts: a dsq artifact whose manifest verifies, or an fp checkpoint.

    A directory with ``manifest.json`` is verified (:func:`dsq.core.manifest.verify_manifest`), and ``output``
    may not lie inside it (the artifact would no longer match its manifest). Without a manifest,
    a compressed-tensors ``quantization_config`` is refused: dsq's artifacts always carry a manifest, so
    such a directory was not written by dsq or lost its manifest. Other quantization methods are left to
    :func:`dsq.quantize.model_dir.load_for_export`, which names the ones that have no ONNX form.

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


ONNX_DIR = "onnx"


def export_rows(section: ExportSection | None, loaded: LoadedModel, root: Path, evaluator: Evaluator | None, name: str,
                torch_row: ModelMetrics) -> list[ModelMetrics]:
    """A recipe's ``export:`` step: ONNX under ``root/onnx`` (validated), and its report row if asked."""
    if section is None:
        return []
    outcome = export_and_evaluate(
        loaded.model, loaded.tokenizer, root / ONNX_DIR, section, evaluator=evaluator, name=name,
        torch_row=torch_row, source=loaded.source.to_dict(),
    )
    if outcome.row is None:
        return []
    # ``root`` is the run's staging directory, renamed to the output when the run ends: the report names the
    # graph relative to the output
    return [replace(outcome.row, onnx=replace(outcome.row.onnx, path=ONNX_DIR))]
