"""The pipeline: a validated recipe in, a quantized artifact and a comparison report out.

Every step is a plain function call with typed inputs and outputs; this module is the only
place that turns recipe sections into stage configs. It never prints: the CLI does.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsq import __version__
from dsq.core.atomic import atomic_directory, claim_output
from dsq.quantize.artifact_save import copy_tokenizer, save_quantized_model, write_config
from dsq.core.manifest import write_manifest
from dsq.assets import data_file, resolve_data_path
from dsq.core.checkpoint import CheckpointFiles, bundled_model_path, source_info, validate_checkpoint
from dsq.core.loading import LoadedModel, load_checkpoint, load_tokenizer
from dsq.core.errors import QuantizationError, RecipeError
from dsq.run.preflight import check_recipe_against_checkpoint
from dsq.core.tied import tie_notes
from dsq.quantize.artifact_load import load_artifact
from dsq.run.streaming import StreamingDecision, decide_streaming
from dsq.run.recipe import QuantizeSection, Recipe, WeightsSection, dump_recipe
from dsq.run.reload import TOLERANCE, ReloadCheck, transformers_reload_check
from dsq.eval import BenchmarkSuite, Evaluator, Gates, GateResult, PerplexityConfig, Report, check_gates, write_report
from dsq.eval.memory import PeakRSS
from dsq.eval.plots import write_plots_if_installed
from dsq.eval.report import SQNR_KEY, weight_sqnr_summary, write_html_report
from dsq.eval.speed import SpeedConfig
from dsq.quantize import (
    AWQConfig, BnbFP4Config, BnbInt8Config, BnbNF4Config, GPTQConfig, PerChannel, PerGroup, QuantizationReport,
    RTNConfig, TargetSpec, W8A8Config, WeightScheme, quantize_,
)
from dsq.quantize.bnb import BNB_CONFIGS, save_bnb_model
from dsq.quantize.calibrated import needs_calibration
from dsq.quantize.calibration_data import CalibrationDataSpec, load_calibration_with_summary
from dsq.quantize.sequential import RESIDENT, LayerLifecycle, OnDevice
from dsq.quantize.w8a8 import DynamicPerToken, StaticPerTensor

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class RunResult:
    """What a run produced."""

    output: Path
    report: Report | None  # None: a streamed run too large to evaluate on this machine
    gates: list[GateResult] = field(default_factory=list)
    reload: ReloadCheck | None = None
    quantization: dict | None = None  # the quantization summary when there is no report

    @property
    def gates_passed(self) -> bool:
        return all(g.passed for g in self.gates)


def weight_scheme(w: WeightsSection) -> WeightScheme:
    granularity = PerChannel() if w.granularity == "channel" else PerGroup(w.group_size)
    return WeightScheme(bits=w.bits, granularity=granularity, symmetric=w.symmetric)


def calibration_spec(section: QuantizeSection) -> CalibrationDataSpec:
    c = section.calibration
    return CalibrationDataSpec(
        path=str(resolve_data_path(c.data)) if c.data else None, dataset=c.dataset, split=c.split, text_field=c.text_field, messages_field=c.messages_field,
        samples=c.samples, seq_len=c.seq_len, seed=c.seed,
    )


def target_spec(section: QuantizeSection) -> TargetSpec:
    t = section.targets
    return TargetSpec(include=tuple(t.include), exclude=tuple(t.exclude), lm_head=t.lm_head)


def quant_config(section: QuantizeSection, dtype: torch.dtype = torch.float32) -> object:
    """Recipe ``quantize:`` section -> the method's typed config (dispatched on by ``quantize_``)."""
    targets = target_spec(section)
    scheme = weight_scheme(section.weights)
    batch = section.calibration.batch_size
    method = section.method
    if method == "rtn":
        return RTNConfig(scheme=scheme, targets=targets)
    if method == "gptq":
        g = section.gptq
        return GPTQConfig(scheme, targets, mse_scales=g.mse_scales, damp=g.damp, block_size=g.block_size,
                          act_order=g.act_order, unrouted_weight=g.unrouted_weight, batch_size=batch)
    if method == "awq":
        a = section.awq
        return AWQConfig(scheme, targets, grid=a.grid, clip=a.clip, search_tokens=a.search_tokens,
                         unrouted_weight=a.unrouted_weight, mse_scales=a.mse_scales, duo_scaling=a.duo_scaling,
                         batch_size=batch)
    if method == "w8a8":
        w = section.w8a8
        act = StaticPerTensor() if w.activations == "static" else DynamicPerToken()
        return W8A8Config(activations=act, smoothquant_alpha=w.smoothquant_alpha, targets=targets, batch_size=batch)
    b = section.bnb
    if method == "bnb-int8":
        return BnbInt8Config(targets=targets, threshold=b.threshold)
    kind = BnbNF4Config if method == "bnb-nf4" else BnbFP4Config
    return kind(targets=targets, compute_dtype=dtype, double_quant=b.double_quant, blocksize=b.blocksize)


def candidate_name(section: QuantizeSection) -> str:
    method = section.method
    if method.startswith("bnb-"):
        return method
    if method == "w8a8":
        smooth = "-sq" if section.w8a8.smoothquant_alpha is not None else ""
        return f"w8a8-{section.w8a8.activations}{smooth}"
    w = section.weights
    gran = "ch" if w.granularity == "channel" else f"g{w.group_size}"
    sym = "" if w.symmetric else "-asym"
    return f"{method}-int{w.bits}-{gran}{sym}"


# transformers' compressed-tensors forward quantizes activations with absmax/127.5 in fp32 where dsq
# runs an integer matmul with absmax/127: each module agrees to ~1e-2 and single int8 steps of later
# activations can flip, so W8A8 artifacts are compared at a looser logit tolerance (said in the report).
W8A8_RELOAD_TOLERANCE = 5e-2


@dataclass
class QuantizeStep:
    """The recipe's ``quantize:`` section made ready: its config and calibration tokens (loaded up front,
    so bad data fails before any evaluation)."""

    config: object
    calibration: torch.Tensor | None = None
    calibration_summary: object | None = None
    device: str | None = None  # where each decoder layer is calibrated and quantized (None: where the model is)

    @classmethod
    def from_recipe(cls, recipe: Recipe, tokenizer) -> "QuantizeStep":
        config = quant_config(recipe.quantize, DTYPES[recipe.dtype])
        device = layer_device(recipe.quantize, config)
        if not needs_calibration(config):
            return cls(config, device=device)
        return cls(config, *load_calibration_with_summary(calibration_spec(recipe.quantize), tokenizer), device=device)

    def lifecycle(self, inner: LayerLifecycle = RESIDENT) -> LayerLifecycle:
        """``inner``, with each layer moved to :attr:`device` while it is quantized when one is set."""
        return OnDevice(inner, self.device) if self.device is not None else inner

    def apply(self, model, *, progress: bool) -> tuple[QuantizationReport, float, int | None]:
        """Quantize ``model`` in place; returns the report, wall seconds and peak RSS."""
        started = time.perf_counter()
        with PeakRSS() as rss:
            qreport = quantize_(model, self.config, calibration=self.calibration, progress=progress, lifecycle=self.lifecycle())
        if self.calibration_summary is not None:
            qreport.calibration = {"data": self.calibration_summary.to_dict(), **(qreport.calibration or {})}
        return qreport, time.perf_counter() - started, rss.peak_bytes


def layer_device(section: QuantizeSection, config: object) -> str | None:
    """``quantize.device`` checked: it must exist here, and bitsandbytes methods quantize where the model is."""
    if section.device is None:
        return None
    if isinstance(config, BNB_CONFIGS):
        raise RecipeError(f"quantize.device is not used by {section.method} (it quantizes where the model is loaded); remove it")
    device = torch.device(section.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"quantize.device: {section.device!r} but CUDA is not available on this machine")
    return section.device


def reload_tolerance(config: object) -> float:
    return W8A8_RELOAD_TOLERANCE if isinstance(config, W8A8Config) else TOLERANCE


def benchmark_suite(recipe: Recipe) -> BenchmarkSuite:
    """Recipe ``eval:`` section -> the suite; missing data paths mean the bundled sets."""
    ev = recipe.eval
    ppl = ev.perplexity
    mc = ev.multiple_choice
    text_path = resolve_data_path(ppl.data) if ppl and ppl.data else (data_file("heldout.txt") if ppl else None)
    mc_path = resolve_data_path(mc.data) if mc and mc.data else (data_file("mc.jsonl") if mc else None)
    ppl_config = PerplexityConfig(context=ppl.context, stride=ppl.stride, max_tokens=ppl.max_tokens) if ppl else PerplexityConfig()
    sp = ev.speed
    speed = SpeedConfig(batch=sp.batch, prompt_len=sp.prompt_len, new_tokens=sp.new_tokens, repeats=sp.repeats) if sp else None
    return BenchmarkSuite(
        text_path=text_path,
        mc_path=mc_path,
        perplexity=ppl_config,
        mc_limit=mc.limit if mc else None,
        mc_num_fewshot=mc.num_fewshot if mc else 0,
        mc_fewshot_seed=mc.fewshot_seed if mc else 1234,
        mc_fewshot_data=resolve_data_path(mc.fewshot_data) if mc and mc.fewshot_data else None,
        mc_fewshot_delimiter=mc.fewshot_delimiter if mc else "\n\n",
        fidelity_seq_len=ev.fidelity.seq_len,
        fidelity_max_tokens=ev.fidelity.max_tokens,
        speed=speed,
    )


def gates_of(recipe: Recipe) -> Gates:
    return Gates(**recipe.eval.gates.model_dump())


def model_path(recipe: Recipe) -> Path:
    return Path(recipe.model).expanduser() if recipe.model else bundled_model_path()


def save_artifact(root: Path, loaded: LoadedModel, recipe: Recipe, config: object) -> None:
    """Weights (compressed-tensors, or bitsandbytes for its methods), config, tokenizer and the resolved recipe."""
    if isinstance(config, BNB_CONFIGS):
        save_bnb_model(loaded.model, loaded.tokenizer, root)
    else:
        save_quantized_model(loaded.model, loaded.tokenizer, root, dtype_name=recipe.dtype, max_shard_bytes=recipe.max_shard_mb << 20)
    (root / "recipe.yaml").write_text(dump_recipe(recipe))


def run(recipe: Recipe) -> RunResult:
    """Run a recipe end to end.

    Args:
        recipe: a validated recipe.

    Returns:
        A :class:`RunResult`; ``gates_passed`` is False when a gate failed (the artifact
        is still written). Recipes with a ``finetune:`` section go through
        :func:`dsq.run.train.run_finetune` (None on non-main processes of a multi-process run). Input problems raise :class:`dsq.core.errors.DsqInputError` and leave
        no artifact behind. A checkpoint is quantized one decoder layer at a time
        (:func:`run_streamed`) when the recipe says ``streaming: true``, or when it leaves
        ``streaming`` unset and the model needs more than half the available memory.
    """
    if recipe.finetune is not None:
        from dsq.run.train import run_finetune

        return run_finetune(recipe)
    with claim_output(Path(recipe.output).expanduser(), recipe.overwrite):  # before the model is loaded
        return _run_quantize(recipe)


def _run_quantize(recipe: Recipe) -> RunResult:
    torch.manual_seed(recipe.seed)
    files = validate_checkpoint(model_path(recipe), trust_remote_code=recipe.trust_remote_code)
    check_recipe_against_checkpoint(recipe, files)  # the recipe against the model, before anything is loaded
    decision = decide_streaming(recipe.streaming, files, DTYPES[recipe.dtype])
    if decision.stream:
        (log.warning if recipe.streaming is None else log.info)("%s", decision.reason)
        return run_streamed(recipe, files, decision)
    output = Path(recipe.output).expanduser()
    suite = benchmark_suite(recipe)
    loaded = load_checkpoint(files.root, dtype=DTYPES[recipe.dtype], trust_remote_code=recipe.trust_remote_code)
    step = QuantizeStep.from_recipe(recipe, loaded.tokenizer)
    config = step.config
    evaluator = Evaluator(suite, loaded.tokenizer, progress=recipe.progress)
    with atomic_directory(output, recipe.overwrite) as tmp:
        original = evaluator.evaluate("original", loaded.model, reference=True, disk_path=files.root)
        qreport, quant_seconds, peak_rss = step.apply(loaded.model, progress=recipe.progress)
        qreport.notes += tie_notes(loaded.model)  # a tied lm_head quantized: the tie is broken
        save_artifact(tmp, loaded, recipe, config)
        reload = _reload_check(recipe, tmp, loaded.model, config)
        name = candidate_name(recipe.quantize)
        candidate = evaluator.evaluate(name, loaded.model, disk_path=tmp)
        candidate.extra["quantization"] = summary(qreport, quant_seconds, peak_rss)
        report, results = _finish(recipe, tmp, loaded, evaluator, original, candidate, qreport, reload, decision)
    return RunResult(output=output, report=report, gates=results, reload=reload)


def _reload_check(recipe: Recipe, root: Path, model, config: object) -> ReloadCheck | None:
    """transformers reloads the artifact and must agree with ``model``; a loaded mismatch fails the run."""
    if not recipe.eval.reload_check:
        return None
    reload = transformers_reload_check(
        root, model, dtype=DTYPES[recipe.dtype], trust_remote_code=recipe.trust_remote_code, tolerance=reload_tolerance(config),
    )
    if reload.loaded and not reload.passed:
        raise QuantizationError(
            f"transformers reloads the artifact with logits differing by {reload.max_abs_diff:.3g} "
            f"(tolerance {reload.tolerance:g}); the artifact does not match dsq's model"
        )
    return reload


def _finish(recipe: Recipe, tmp: Path, loaded: LoadedModel, evaluator: Evaluator, original, candidate, qreport: QuantizationReport,
            reload: ReloadCheck | None, decision: StreamingDecision) -> tuple[Report, list[GateResult]]:
    """Export rows, gates, report, plots and manifest of a quantized run (in memory or streamed)."""
    candidate.extra["reload_check"] = reload.to_dict() if reload else None
    candidates = [candidate, *export_rows(recipe, loaded, tmp, evaluator, candidate.name, candidate)]
    results = check_gates(gates_of(recipe), original, candidates)
    meta = run_meta(recipe, loaded)
    meta["streaming"] = {"streamed": decision.stream, "reason": decision.reason}
    report = Report(original, candidates, results, meta=meta)
    write_report(report, tmp)
    write_plots_if_installed(tmp, qreport.to_dict())
    write_html_report(report, tmp)  # again, now with the plots embedded
    write_manifest(tmp, source=loaded.source.to_dict(), extra={"quantization": qreport.to_dict()})
    return report, results


def _require_streamable(config: object) -> None:
    if not isinstance(config, (RTNConfig, GPTQConfig, AWQConfig)):
        raise RecipeError(
            f"streaming supports quantize.method rtn, gptq and awq; {type(config).__name__} needs the whole model "
            "in memory (set streaming: false on a machine where it fits)"
        )


def run_streamed(recipe: Recipe, files: CheckpointFiles, decision: StreamingDecision) -> RunResult:
    """Quantize one decoder layer at a time from the checkpoint's shards, then evaluate when the model fits.

    The artifact's tensors are identical to the in-memory path's. Evaluation loads the original
    and the artifact in memory; when the model does not fit (the reason streaming was chosen),
    it is not run: the report says so, and every gate the recipe sets fails as not evaluated.
    """
    from dsq.quantize.streaming import quantize_streaming

    dtype = DTYPES[recipe.dtype]
    output = Path(recipe.output).expanduser()
    tokenizer = load_tokenizer(files.root, trust_remote_code=recipe.trust_remote_code)
    step = QuantizeStep.from_recipe(recipe, tokenizer)
    _require_streamable(step.config)
    source = source_info(files)
    evaluate = not decide_streaming(None, files, dtype).stream
    suite = benchmark_suite(recipe)  # bad benchmark paths fail before hours of streaming
    with atomic_directory(output, recipe.overwrite) as tmp:
        with PeakRSS() as rss:
            streamed = quantize_streaming(
                files.root, tmp, step.config, calibration=step.calibration, dtype=dtype,
                trust_remote_code=recipe.trust_remote_code, max_shard_bytes=recipe.max_shard_mb << 20, progress=recipe.progress,
                device=step.device,
            )
        qreport = streamed.report
        if step.calibration_summary is not None:
            qreport.calibration = {"data": step.calibration_summary.to_dict(), **(qreport.calibration or {})}
        write_config(streamed.config, tmp)
        copy_tokenizer(tokenizer, tmp)
        (tmp / "recipe.yaml").write_text(dump_recipe(recipe))
        quant = summary(qreport, streamed.seconds, rss.peak_bytes)
        quant["streaming"] = {
            "seconds_reading": round(streamed.seconds_reading, 3), "seconds_writing": round(streamed.seconds_writing, 3),
            "unused_checkpoint_tensors": len(streamed.unused_tensors), "weight_files": len(streamed.files),
        }
        if not evaluate:
            results = _not_evaluated(recipe, tmp, quant, decision, source)
            write_manifest(tmp, source=source.to_dict(), extra={"quantization": qreport.to_dict()})
            return RunResult(output=output, report=None, gates=results, reload=None, quantization=quant)
        evaluator = Evaluator(suite, tokenizer, progress=recipe.progress)
        original_model = load_checkpoint(files.root, dtype=dtype, trust_remote_code=recipe.trust_remote_code).model
        original = evaluator.evaluate("original", original_model, reference=True, disk_path=files.root)
        del original_model
        artifact = load_artifact(tmp, dtype=dtype)
        loaded = LoadedModel(model=artifact.model, tokenizer=tokenizer, source=source, notes=files.notes)
        reload = _reload_check(recipe, tmp, loaded.model, step.config)
        candidate = evaluator.evaluate(candidate_name(recipe.quantize), loaded.model, disk_path=tmp)
        candidate.extra["quantization"] = quant
        report, results = _finish(recipe, tmp, loaded, evaluator, original, candidate, qreport, reload, decision)
    return RunResult(output=output, report=report, gates=results, reload=reload)


def _not_evaluated(recipe: Recipe, root: Path, quant: dict, decision: StreamingDecision, source) -> list[GateResult]:
    """report.json / report.md of a streamed run too large to evaluate here; every set gate fails as not evaluated."""
    reason = f"not evaluated: {decision.reason}; run `dsq validate` on a machine where the model fits"
    name = candidate_name(recipe.quantize)
    results = [
        GateResult(gate=g, candidate=name, metric=g, value=float("nan"), threshold=float(t), passed=False, message=f"{g}: {reason}")
        for g, t in recipe.eval.gates.model_dump().items() if t is not None
    ]
    data = {
        "candidate": name, "evaluation": reason, "quantization": quant,
        "gates": [{"gate": r.gate, "passed": r.passed, "message": r.message} for r in results],
        "meta": {"model": source.path, "model_type": source.model_type, "streaming": {"streamed": True, "reason": decision.reason}},
    }
    (root / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    lines = [f"# dsq report: {name}", "", f"Evaluation {reason}.", "",
             f"Quantized {quant['quantized_params']:,} parameters in {quant['seconds']:.1f} s; peak RSS {quant['peak_rss_bytes'] or 0:,} bytes."]
    lines += [f"- NOTE: {n}" for n in quant.get("notes", [])]
    lines += [f"- GATE NOT EVALUATED: {r.message}" for r in results]
    (root / "report.md").write_text("\n".join(lines) + "\n")
    return results


ONNX_DIR = "onnx"


def export_rows(recipe: Recipe, loaded: LoadedModel, root: Path, evaluator: Evaluator, name: str, torch_row) -> list:
    """The recipe's ``export:`` step: ONNX under ``root/onnx`` (validated), and its report row if asked."""
    if recipe.export is None:
        return []
    from dsq.run.export_step import export_and_evaluate

    outcome = export_and_evaluate(
        loaded.model, loaded.tokenizer, root / ONNX_DIR, recipe.export, evaluator=evaluator, name=name,
        torch_row=torch_row, source=loaded.source.to_dict(),
    )
    return [outcome.row] if outcome.row is not None else []


def summary(qreport: QuantizationReport, seconds: float, peak_rss: int | None) -> dict:
    d = qreport.to_dict()
    sqnr = weight_sqnr_summary(d.pop("modules"))
    if sqnr is not None:
        d[SQNR_KEY] = sqnr  # the report's Worst layers section
    d["seconds"] = round(seconds, 3)
    d["peak_rss_bytes"] = peak_rss
    return d


def run_meta(recipe: Recipe, loaded: LoadedModel) -> dict:
    return {
        "dsq_version": __version__,
        "model": loaded.source.path,
        "model_type": loaded.source.model_type,
        "recipe": recipe.model_dump(mode="json"),
        "checkpoint_notes": list(loaded.notes),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
