"""The pipeline: a validated recipe in, a quantized artifact and a comparison report out.

Every step is a plain function call with typed inputs and outputs; recipe sections become stage
configs in :mod:`dsq.run.steps` and each method's own section. It never prints: the CLI does.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from dsq.core.atomic import atomic_directory, claim_output
from dsq.core.checkpoint import CheckpointFiles, checkpoint_dir, read_config, source_info
from dsq.core.errors import RecipeError
from dsq.core.manifest import write_manifest
from dsq.core.ranks import SINGLE, Ranks, leave_group
from dsq.core.loading import LoadedModel, load_checkpoint, load_tokenizer
from dsq.core.tied import tie_notes
from dsq.eval import Evaluator, GateResult, NotEvaluatedReport, QuantizationFacts, ReloadNotRun, Report, StreamingFacts, write_report
from dsq.eval.memory import PeakRSS
from dsq.quantize import method_of
from dsq.quantize.artifact_load import load_artifact
from dsq.quantize.artifact_save import copy_tokenizer, write_config
from dsq.quantize.kv_cache import KVCacheUnsupported, kv_layout
from dsq.quantize.method import method_names
from dsq.quantize.streaming import quantize_streaming
from dsq.run.export_step import export_rows
from dsq.run.ranked import calibrate_share, check_kv_cache_run, checked_source, join_ranks
from dsq.run.recipe import Recipe, dump_recipe
from dsq.run.steps import DTYPES, KVCacheStep, QuantizeStep, benchmark_suite, gates_of, model_path, run_meta, save_artifact
from dsq.run.streaming import StreamingDecision, decide_streaming
from dsq.run.tail import ReloadSettings, RunResult, RunTail, write_artifact_records
from dsq.run.train import run_finetune

log = logging.getLogger(__name__)


def run(recipe: Recipe) -> RunResult:
    """Run a recipe end to end.

    Args:
        recipe: a validated recipe.

    Returns:
        A :class:`RunResult`; ``gates_passed`` is False when a gate failed (the artifact
        is still written). Recipes with a ``finetune:`` section go through
        :func:`dsq.run.train.run_finetune` (None on non-main processes of a multi-process run). Input
        problems raise :class:`dsq.core.errors.DsqInputError` and leave no artifact behind. A checkpoint
        is quantized one decoder layer at a time (:func:`run_streamed`) when the recipe says
        ``streaming: true``, or when it leaves ``streaming`` unset and the model needs more than half
        the available memory.
    """
    if recipe.search is not None:
        raise RecipeError("search: this recipe searches per-module schemes; run it with `dsq search RECIPE`")
    if recipe.finetune is not None:
        return run_finetune(recipe)
    _check_kv_cache_architecture(recipe)  # every process, before any of them joins the group
    ranks = join_ranks(recipe)  # torchrun: several processes share calibration; only rank 0 writes
    if not ranks.main:
        return calibrate_share(recipe, ranks)
    with claim_output(Path(recipe.output).expanduser(), recipe.overwrite):  # before the model is loaded
        return _run_quantize(recipe, ranks)


def run_tail(recipe: Recipe, evaluator: Evaluator | None, loaded_meta: dict) -> RunTail:
    """The tail of a recipe's run: its gates, its report meta and its reload check."""
    reload = ReloadSettings(DTYPES[recipe.dtype], recipe.trust_remote_code) if recipe.eval.reload_check else None
    return RunTail(evaluator, gates_of(recipe.eval), loaded_meta, reload)


def _run_quantize(recipe: Recipe, ranks: Ranks = SINGLE) -> RunResult:
    files, decision = checked_source(recipe, ranks)
    check_kv_cache_run(recipe, decision)
    if decision.stream:
        (log.warning if recipe.streaming is None else log.info)("%s", decision.reason)
        return run_streamed(recipe, files, decision)
    output = Path(recipe.output).expanduser()
    suite = benchmark_suite(recipe.eval)
    loaded = load_checkpoint(files, dtype=DTYPES[recipe.dtype], trust_remote_code=recipe.trust_remote_code)
    step = QuantizeStep.from_recipe(recipe, loaded.tokenizer)
    kv = KVCacheStep.from_recipe(recipe, loaded.tokenizer, step)
    tail = run_tail(recipe, Evaluator(suite, loaded.tokenizer, progress=recipe.progress), run_meta(recipe, loaded.source, loaded.notes))
    with atomic_directory(output, recipe.overwrite) as tmp:
        original = tail.evaluate("original", loaded.model, files.root, reference=True)
        qreport, quant_seconds, peak_rss = step.apply(loaded.model, progress=recipe.progress)
        leave_group()  # the other ranks are done; what follows is the main process's alone
        if kv is not None:  # the KV-cache scales are calibrated on the quantized model
            started = time.perf_counter()
            kv.apply(loaded.model, qreport, progress=recipe.progress)
            quant_seconds += time.perf_counter() - started
        qreport.notes += tie_notes(loaded.model)  # a tied lm_head quantized: the tie is broken
        save_artifact(tmp, loaded, recipe, step.config)
        reload = tail.reload_check(tmp, loaded.model, method_of(step.config).reload_tolerance)
        facts = QuantizationFacts(qreport, quant_seconds, peak_rss)
        name = kv.row_name(step.name) if kv is not None else step.name
        candidate = tail.evaluate(name, loaded.model, tmp, quantization=facts, reload_check=reload or ReloadNotRun())
        report, results = _finish(recipe, tail, tmp, loaded, original, candidate, facts, decision)
    return RunResult(output=output, report=report, gates=results, reload=reload)


def _check_kv_cache_architecture(recipe: Recipe) -> None:
    """A ``kv_cache:`` section needs an architecture whose cache dsq quantizes (read from config.json alone).

    Raises:
        RecipeError: the architecture is refused (named, with the reason).
        CheckpointError: no readable config.json.
    """
    if recipe.kv_cache is None:
        return
    root = checkpoint_dir(model_path(recipe))
    try:
        kv_layout(read_config(root))
    except KVCacheUnsupported as exc:
        raise RecipeError(f"kv_cache: {exc} ({root / 'config.json'})") from None


def _finish(recipe: Recipe, tail: RunTail, tmp: Path, loaded: LoadedModel, original, candidate, facts: QuantizationFacts,
            decision: StreamingDecision) -> tuple[Report, list[GateResult]]:
    """Export rows, gates, report and manifest of a quantized run (in memory or streamed)."""
    rows = [candidate, *export_rows(recipe.export, loaded, tmp, tail.evaluator, candidate.name, candidate)]
    tail.meta["streaming"] = {"streamed": decision.stream, "reason": decision.reason}
    report, results = tail.conclude(original, rows)
    write_artifact_records(report, tmp, loaded.source.to_dict(), {"quantization": facts.record})
    return report, results


def _require_streamable(step: QuantizeStep) -> None:
    if not method_of(step.config).streams:
        raise RecipeError(
            f"streaming supports quantize.method {', '.join(method_names(lambda m: m.streams))}; {step.section.method} "
            "needs the whole model in memory (set streaming: false on a machine where it fits)"
        )


def run_streamed(recipe: Recipe, files: CheckpointFiles, decision: StreamingDecision) -> RunResult:
    """Quantize one decoder layer at a time from the checkpoint's shards, then evaluate when the model fits.

    The artifact's tensors are identical to the in-memory path's. Evaluation loads the original
    and the artifact in memory; when the model does not fit (the reason streaming was chosen),
    it is not run: the report says so, and every gate the recipe sets fails as not evaluated.
    """
    check_kv_cache_run(recipe, decision)  # kv_cache needs the model in memory
    dtype = DTYPES[recipe.dtype]
    output = Path(recipe.output).expanduser()
    tokenizer = load_tokenizer(files.root, trust_remote_code=recipe.trust_remote_code)
    step = QuantizeStep.from_recipe(recipe, tokenizer)
    _require_streamable(step)
    source = source_info(files)
    evaluate = not decide_streaming(None, files, dtype).stream
    suite = benchmark_suite(recipe.eval)  # bad benchmark paths fail before hours of streaming
    with atomic_directory(output, recipe.overwrite) as tmp:
        with PeakRSS() as rss:
            streamed = quantize_streaming(
                files, tmp, step.config, calibration=step.calibration, dtype=dtype,
                trust_remote_code=recipe.trust_remote_code, max_shard_bytes=recipe.max_shard_mb << 20, progress=recipe.progress,
                device=step.device,
            )
        leave_group()  # the other ranks are done; what follows is the main process's alone
        qreport = streamed.report
        step.record_calibration(qreport)
        write_config(streamed.config, tmp)
        copy_tokenizer(tokenizer, tmp)
        (tmp / "recipe.yaml").write_text(dump_recipe(recipe))
        facts = QuantizationFacts(qreport, streamed.seconds, rss.peak_bytes, StreamingFacts.of(streamed))
        if not evaluate:
            meta = {"model": source.path, "model_type": source.model_type, "streaming": {"streamed": True, "reason": decision.reason}}
            not_evaluated = NotEvaluatedReport.of(step.name, decision.reason, gates_of(recipe.eval), facts, meta)
            write_report(not_evaluated, tmp)
            write_manifest(tmp, source=source.to_dict(), extra={"quantization": facts.record})
            return RunResult(output=output, report=None, gates=not_evaluated.gates, reload=None, quantization=facts)
        tail = run_tail(recipe, Evaluator(suite, tokenizer, progress=recipe.progress), run_meta(recipe, source, files.notes))
        original_model = load_checkpoint(files, dtype=dtype, trust_remote_code=recipe.trust_remote_code).model
        original = tail.evaluate("original", original_model, files.root, reference=True)
        del original_model
        loaded = LoadedModel(model=load_artifact(tmp, dtype=dtype).model, tokenizer=tokenizer, source=source, notes=files.notes)
        reload = tail.reload_check(tmp, loaded.model, method_of(step.config).reload_tolerance)
        candidate = tail.evaluate(step.name, loaded.model, tmp, quantization=facts, reload_check=reload or ReloadNotRun())
        report, results = _finish(recipe, tail, tmp, loaded, original, candidate, facts, decision)
    return RunResult(output=output, report=report, gates=results, reload=reload)

