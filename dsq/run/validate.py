"""``dsq validate``: the CI gate for a quantized artifact (torch or ONNX).

1. Integrity: the manifest (``manifest.json`` of an artifact, ``export_manifest.json`` of an ONNX
   export) lists exactly the files under the directory, each inside it and with its sha256
   (:mod:`dsq.core.manifest`); otherwise :class:`ArtifactIntegrityError` (exit 2) naming the file.
2. Evaluation: the benchmark sets of the gates file's ``eval`` settings (default: the bundled sets)
   on the baseline (if given) and the artifact.
3. Gates: absolute ones (``max_ppl``, ``min_mc_acc``) and, with a baseline, relative ones
   (perplexity increase, accuracy drop, recovery, size and speed ratios, top-1, KL).
4. Outputs: report.{json,md}, junit.xml and summary.md in the output directory, written together
   (:func:`dsq.core.atomic.atomic_directory`); an earlier output of ``dsq validate`` there is replaced, a
   directory it did not write is refused.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from dsq.core.atomic import MANIFEST, atomic_directory, claim_output
from dsq.core.errors import DsqInputError, RecipeError
from dsq.core.manifest import EXPORT_MANIFEST, ArtifactIntegrityError, verify_manifest  # noqa: F401 (re-exported)
from dsq.core.schema import format_errors
from dsq.core.yaml_file import read_yaml
from dsq.run.recipe import EvalSection, check_eval_section
from dsq.run.steps import benchmark_suite
from dsq.run.tail import RunTail
from dsq.eval import ArtifactQuantization, Evaluator, Gates, GateResult, Report, write_report
from dsq.eval.ci import summary_markdown, write_junit
from dsq.core.check import Check

VALIDATION_MARKER = ".dsq-validation"  # marks an output directory as written by dsq validate
RELATIVE_GATES = (
    "max_ppl_increase_pct", "max_mc_acc_drop_pts", "min_top1_agreement", "max_mean_kl", "max_size_ratio",
    "min_mc_recovery_pct", "min_prefill_speed_ratio", "min_decode_speed_ratio",
)


def load_gates_file(path: Path | None, artifact: Path) -> EvalSection:
    """The ``eval`` settings and gates: a YAML file shaped like a recipe's ``eval:`` section.

    Without a file: the artifact's own recipe (``recipe.yaml`` beside the weights) if it has one, else
    the defaults (bundled benchmark sets, no gates). The gates are checked as in a recipe: ranges, and
    every gate's measurement must be one the file's sections produce.

    Raises:
        RecipeError: Naming the file and the key: unreadable or invalid YAML, an unknown key, a value out
            of range, or a gate whose section is null.
    """
    prefix = ""
    if path is None:
        recipe = artifact / "recipe.yaml"
        tree = read_yaml(recipe).get("eval", {}) if recipe.is_file() else {}
        source = f"{recipe} (eval section)" if recipe.is_file() else "(defaults)"
        prefix = "eval." if recipe.is_file() else ""
    else:
        tree, source = read_yaml(path, "gates file"), str(path)
    try:
        section = EvalSection.model_validate(tree)
    except ValidationError as exc:
        raise RecipeError(format_errors(exc, source, EvalSection)) from None
    check_eval_section(section, source, prefix)
    return section


def _load(path: Path):
    """``(model, tokenizer)``: an ONNX export runs in ONNX Runtime, anything else in torch."""
    if (path / "model.onnx").is_file():
        from transformers import AutoTokenizer

        from dsq.export import OrtCausalLM

        return OrtCausalLM(path), AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    from dsq.quantize.model_dir import load_for_export

    loaded = load_for_export(path)
    return loaded.model, loaded.tokenizer


def _quantization_record(artifact: Path) -> dict | None:
    """The artifact's quantization record (``manifest.json["quantization"]``), if it has one."""
    try:
        record = json.loads((artifact / MANIFEST).read_text()).get("quantization")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return record if isinstance(record, dict) else None


@dataclass
class ValidateResult:
    report: Report
    checks: list[Check]
    gates: list[GateResult]
    output: Path

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and all(g.passed for g in self.gates)


def validate(artifact: Path, *, baseline: Path | None = None, gates_file: Path | None = None,
             output: Path | None = None, progress: bool = True) -> ValidateResult:
    """Verify, evaluate and gate ``artifact``; write the CI outputs into ``output``.

    Raises:
        ArtifactIntegrityError: the manifest check failed (before anything is loaded).
        DsqInputError: unusable gates file, artifact or baseline; a relative gate without a baseline.
    """
    output = output or artifact.parent / f"{artifact.name}-validation"
    if output.resolve().is_relative_to(artifact.resolve()):
        raise DsqInputError(f"output {output} is inside the artifact {artifact}: the report would change what it "
                            "validates; write it beside the artifact")
    with claim_output(output, True, VALIDATION_MARKER):  # held from before the model is loaded
        return _validate(artifact, baseline, gates_file, output, progress)


def _validate(artifact: Path, baseline: Path | None, gates_file: Path | None, output: Path,
              progress: bool) -> ValidateResult:
    integrity = verify_manifest(artifact)
    section = load_gates_file(gates_file, artifact)
    gates = Gates(**section.gates.model_dump())
    relative = [g for g in RELATIVE_GATES if getattr(gates, g) is not None]
    if relative and baseline is None:
        raise DsqInputError(f"gate {relative[0]} compares with a baseline: pass --baseline (the original model)")
    model, tokenizer = _load(artifact)
    tail = RunTail(Evaluator(benchmark_suite(section), tokenizer, progress=progress), gates,
                   meta={"artifact": str(artifact), "baseline": str(baseline) if baseline else None})
    reference = None
    if baseline is not None:
        base_model, _ = _load(baseline)
        reference = tail.evaluate(f"baseline ({baseline.name})", base_model, baseline, reference=True)
        del base_model
    quant_record = _quantization_record(artifact)
    facts = {"quantization": ArtifactQuantization(quant_record)} if quant_record is not None else {}
    row = tail.evaluate(artifact.name, model, artifact, **facts)
    original = reference if reference is not None else row
    report, results = tail.conclude(original, [row] if reference is not None else [], gated=[row])
    # all files or none: an earlier validation output (it has the marker) is swapped out, anything else refused
    with atomic_directory(output, overwrite=True, marker=VALIDATION_MARKER) as tmp:
        write_report(report, tmp)
        title = f"dsq validate {artifact}"
        write_junit(tmp / "junit.xml", title, [integrity], results, report)
        (tmp / "summary.md").write_text(summary_markdown(title, [integrity], results, report))
        (tmp / VALIDATION_MARKER).write_text(json.dumps({"kind": "dsq-validation", "version": 1, "artifact": str(artifact)}) + "\n")
    return ValidateResult(report, [integrity], results, output)
