"""The pipeline's training road: QAT or LoRA from a recipe's ``finetune:`` section.

QAT: the ``quantize:`` section names the target format and the starting point (``rtn``: the FP
base, which at step 0 is exactly round-to-nearest; ``gptq`` / ``awq``: that PTQ result). The
model is fake-quantized, trained (distilled from the original by default), converted with the
same scheme and saved in the same compressed-tensors artifact as PTQ. The report has a row for
the starting point and one for the QAT model, so the recovered share of the gap is read off it.

LoRA: on the FP base (``quantize: null``) or on the quantized base (QLoRA). The adapter is saved
in PEFT format under ``adapter/`` with the base's identity; with ``merge: true`` it is merged
(exactly on FP; dequantize, merge, re-quantize with the same scheme on a quantized base) and
the merged model is the artifact, with its drift against the adapter model in the report.

Several processes (``torchrun --nproc_per_node N -m dsq run RECIPE``): every rank loads the
model and data and trains; the main process alone evaluates and writes the artifact. With
``finetune.training.fsdp: true`` the ranks train a sharded model (FSDP2) and get the full, plain
model back before the main process converts, merges and saves it.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dsq.core.atomic import atomic_directory, claim_output
from dsq.assets import resolve_data_path
from dsq.core.checkpoint import validate_checkpoint
from dsq.core.loading import LoadedModel, load_checkpoint
from dsq.run.preflight import check_recipe_against_checkpoint
from dsq.run.recipe import FinetuneSection, LoraSection, Recipe, TrainDataSection, TrainingSection
from dsq.eval.reload import ReloadCheck
from dsq.core.tied import tie_notes
from dsq.eval import Evaluator
from dsq.eval import ExactMerge, LoraFacts, ModelMetrics, QuantizationFacts, ReloadNotRun, RequantizedMerge, TrainingFacts
from dsq.eval.memory import PeakRSS
from dsq.finetune.data import InstructionFields, TextFields, TrainDataSpec, TrainingData, load_training_data
from dsq.finetune.qat import QATConfig, convert_qat, prepare_qat
from dsq.finetune.trainer import Constant, Cosine, Linear, TrainConfig, make_accelerator, train
from dsq.quantize import QuantizationReport
from dsq.quantize import RTNConfig, method_of
from dsq.quantize.method import TOLERANCE
from dsq.run.export_step import export_rows
from dsq.run.recipe import dump_recipe
from dsq.run.steps import DTYPES, QuantizeStep, benchmark_suite, gates_of, model_path, run_meta, save_artifact
from dsq.run.tail import ReloadSettings, RunResult, RunTail, write_artifact_records

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- recipe -> configs


def train_config(section: TrainingSection, distill_weight: float = 0.0) -> TrainConfig:
    schedules = {"cosine": Cosine(section.min_lr_ratio), "linear": Linear(section.min_lr_ratio), "constant": Constant()}
    return TrainConfig(
        max_steps=section.max_steps, batch_size=section.batch_size, grad_accum=section.grad_accum, lr=section.lr,
        warmup_steps=section.warmup_steps, schedule=schedules[section.schedule], weight_decay=section.weight_decay,
        max_grad_norm=section.max_grad_norm, mixed_precision=section.mixed_precision, distill_weight=distill_weight,
        eval_every=section.eval_every, save_every=section.save_every, keep_checkpoints=section.keep_checkpoints,
        seed=section.seed, fsdp=section.fsdp,
    )


def data_spec(section: TrainDataSection) -> TrainDataSpec:
    if section.prompt_field is not None or section.messages_field is not None:
        fields = InstructionFields(
            prompt_field=section.prompt_field or "prompt", response_field=section.response_field or "response",
            messages_field=section.messages_field,
        )
    else:
        fields = TextFields(text_field=section.text_field)
    return TrainDataSpec(
        train=resolve_data_path(section.train),
        validation=resolve_data_path(section.validation) if section.validation else None,
        split=section.split, fields=fields, seq_len=section.seq_len, val_fraction=section.val_fraction,
        seed=section.seed, pack=section.pack,
    )


def lora_spec(section: LoraSection):
    from dsq.finetune.lora import LoraSpec

    targets = tuple(section.targets) if section.targets is not None else None
    return LoraSpec(r=section.r, alpha=section.alpha, dropout=section.dropout, targets=targets,
                    routed_experts=section.routed_experts)


def checkpoint_dir(recipe: Recipe, output: Path) -> Path:
    section = recipe.finetune.training
    return Path(section.checkpoint_dir).expanduser() if section.checkpoint_dir else output.with_name(output.name + ".checkpoints")


# ----------------------------------------------------------------------------- shared steps


@dataclass
class _Context:
    """What every step of a training run shares."""

    recipe: Recipe
    loaded: LoadedModel
    data: TrainingData
    accelerator: object
    tail: RunTail  # its evaluator is None on non-main processes
    output: Path

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def finetune(self) -> FinetuneSection:
        return self.recipe.finetune


def _ptq(ctx: _Context, model: nn.Module) -> tuple[object, QuantizationReport, float]:
    """Run the recipe's ``quantize:`` section on ``model`` (the QAT start or the QLoRA base)."""
    step = QuantizeStep.from_recipe(ctx.recipe, ctx.loaded.tokenizer)
    qreport, seconds, _ = step.apply(model, progress=ctx.recipe.progress and ctx.main)
    qreport.notes += tie_notes(model)
    return step.config, qreport, seconds


def _train(ctx: _Context, model: nn.Module, distill_weight: float, teacher: nn.Module | None) -> TrainingFacts:
    config = train_config(ctx.finetune.training, distill_weight)
    with PeakRSS() as rss:
        result = train(
            model, ctx.data, config, checkpoint_dir=checkpoint_dir(ctx.recipe, ctx.output),
            resume=ctx.finetune.training.resume, teacher=teacher, accelerator=ctx.accelerator,
            progress=ctx.recipe.progress and ctx.main,
        )
    _leave_process_group(ctx.accelerator)
    return TrainingFacts(result.to_dict(), rss.peak_bytes, ctx.data.summary.to_dict())


def _leave_process_group(accelerator) -> None:
    """After training only the main process works: end the process group so that libraries it
    calls (compressed-tensors, transformers) do not wait on collectives the other ranks never join."""
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()


def _reload_check(ctx: _Context, root: Path, model: nn.Module, config: object | None) -> ReloadCheck | None:
    return ctx.tail.reload_check(root, model, method_of(config).reload_tolerance if config is not None else TOLERANCE)


def _save(ctx: _Context, root: Path, model: nn.Module, config: object | None) -> None:
    """Quantized models as PTQ artifacts are saved; an FP model as a plain transformers checkpoint."""
    if config is None:
        model.save_pretrained(str(root))
        ctx.loaded.tokenizer.save_pretrained(str(root))
        (root / "recipe.yaml").write_text(dump_recipe(ctx.recipe))
        return
    save_artifact(root, LoadedModel(model=model, tokenizer=ctx.loaded.tokenizer, source=ctx.loaded.source), ctx.recipe, config)


def _evaluate(ctx: _Context, name: str, model: nn.Module, root: Path | None = None, **facts) -> ModelMetrics:
    return ctx.tail.evaluate(name, model, root, **facts)


def _finish(ctx: _Context, tmp: Path, original: ModelMetrics, rows: list[ModelMetrics], manifest_extra: dict,
            reload: ReloadCheck | None, gated: list[ModelMetrics] | None = None) -> RunResult:
    # the artifact's row (and its ONNX row) is gated, not the intermediate ones
    report, results = ctx.tail.conclude(original, rows, gated if gated is not None else rows[-1:])
    write_artifact_records(report, tmp, ctx.loaded.source.to_dict(), manifest_extra)
    return RunResult(output=ctx.output, report=report, gates=results, reload=reload)


# ----------------------------------------------------------------------------- QAT


def _qat(ctx: _Context, tmp: Path | None, original: ModelMetrics | None):
    recipe, model = ctx.recipe, ctx.loaded.model
    section = ctx.finetune.qat
    teacher = copy.deepcopy(model) if section.distill_weight > 0 else None
    ptq_report = None
    if recipe.quantize.method != "rtn":
        _, ptq_report, _ = _ptq(ctx, model)  # QAT starts from this PTQ result
    config = QATConfig(recipe.quantize.weights.scheme(), recipe.quantize.targets.spec(),
                       learnable_scales=section.learnable_scales, mse_init=section.mse_init)
    prepare_qat(model, config)
    start_row = None
    if ctx.main:  # the starting point, converted exactly as the trained model will be
        start = copy.deepcopy(model)
        convert_qat(start)
        start_row = _evaluate(ctx, f"qat step 0 ({_start_name(recipe)})", start)
        del start
    result = _train(ctx, model, section.distill_weight, teacher)
    if not ctx.main:
        return None
    started = time.perf_counter()
    qreport = convert_qat(model, method=f"qat-from-{recipe.quantize.method}")
    if ptq_report is not None:
        qreport.calibration = ptq_report.calibration
    qreport.notes += tie_notes(model)
    save_artifact_config = _rtn_like_config(config)
    _save(ctx, tmp, model, save_artifact_config)
    reload = _reload_check(ctx, tmp, model, save_artifact_config)
    name = f"qat-{recipe.quantize.row_name()}"
    facts = QuantizationFacts(qreport, time.perf_counter() - started, None)
    row = _evaluate(ctx, name, model, tmp, quantization=facts, training=result, reload_check=reload or ReloadNotRun())
    onnx_rows = export_rows(recipe.export, ctx.loaded, tmp, ctx.tail.evaluator, name, row)
    return _finish(ctx, tmp, original, [start_row, row, *onnx_rows],
                   {"quantization": facts.record, "training": result.to_dict()}, reload, gated=[row, *onnx_rows])


def _start_name(recipe: Recipe) -> str:
    """What step 0 of QAT is: the PTQ result, or round-to-nearest with min/max or searched ranges."""
    section = recipe.finetune.qat
    if recipe.quantize.method == "rtn" and section.learnable_scales and section.mse_init:
        return recipe.quantize.row_name() + " range-searched"
    return recipe.quantize.row_name()


def _rtn_like_config(config: QATConfig):
    """The PTQ config whose artifact layout a QAT model shares (compressed-tensors, same scheme)."""
    return RTNConfig(scheme=config.scheme, targets=config.targets)


# ----------------------------------------------------------------------------- LoRA


def _base_identity(ctx: _Context, ptq_config: object | None) -> dict:
    source = ctx.loaded.source.to_dict()
    return {
        "model": source.get("path"),
        "model_type": source.get("model_type"),
        "fingerprint": source.get("fingerprint"),
        "quantization": ctx.recipe.quantize.row_name() if ptq_config is not None else "none",
    }


def _lora(ctx: _Context, tmp: Path | None, original: ModelMetrics | None):
    from dsq.finetune.lora import apply_lora, save_adapter, trainable_share
    from dsq.eval.drift import measure_merge_drift
    from dsq.finetune.merge import merge_into_fp, merge_requantize

    recipe, model = ctx.recipe, ctx.loaded.model
    section = ctx.finetune.lora
    rows: list[ModelMetrics] = []
    ptq_config, ptq_facts, base_name = None, None, "fp"
    if recipe.quantize is not None:
        ptq_config, ptq_report, seconds = _ptq(ctx, model)
        ptq_facts = QuantizationFacts(ptq_report, seconds, None)
        base_name = recipe.quantize.row_name()
        if ctx.main:
            rows.append(_evaluate(ctx, f"{base_name} (QLoRA base)", model, quantization=ptq_facts))
    peft_model = apply_lora(model, lora_spec(section))
    trainable, total = trainable_share(peft_model)
    result = _train(ctx, peft_model, 0.0, None)
    if not ctx.main:
        return None
    lora_facts = LoraFacts(base_name, trainable, total, section.r, section.alpha)
    identity = _base_identity(ctx, ptq_config)
    save_adapter(peft_model, tmp / "adapter", identity)
    rows.append(_evaluate(ctx, f"lora-{base_name}", peft_model, tmp / "adapter", training=result, lora=lora_facts))
    manifest_extra = {"training": result.to_dict(), "lora": lora_facts.to_dict(), "adapter_base": identity}
    if ptq_facts is not None:
        manifest_extra["quantization"] = ptq_facts.record
    if not section.merge:
        base = peft_model.get_base_model()
        _save(ctx, tmp, base, ptq_config)
        return _finish(ctx, tmp, original, rows, manifest_extra, None)
    if ptq_config is None:
        merged = merge_into_fp(peft_model)
        merge_facts = ExactMerge()
    else:
        adapter_model = copy.deepcopy(peft_model)
        merged, records = merge_requantize(peft_model)
        drift = measure_merge_drift(adapter_model, merged, ctx.tail.evaluator.token_ids)
        del adapter_model
        merge_facts = RequantizedMerge(drift.to_dict(), [r.to_dict() for r in records])
    _save(ctx, tmp, merged, ptq_config)
    reload = _reload_check(ctx, tmp, merged, ptq_config)
    rows.append(_evaluate(ctx, f"lora-merged-{base_name}", merged, tmp, merge=merge_facts, reload_check=reload or ReloadNotRun()))
    manifest_extra["merge"] = merge_facts.to_dict()
    return _finish(ctx, tmp, original, rows, manifest_extra, reload)


# ----------------------------------------------------------------------------- entry


def run_finetune(recipe: Recipe):
    """Run a recipe with a ``finetune:`` section; returns the pipeline's ``RunResult``.

    On a non-main process of a multi-process run it returns None after training.
    """
    torch.manual_seed(recipe.seed)
    output = Path(recipe.output).expanduser()
    accelerator = make_accelerator()
    # only the main process writes; it holds the output from before the model is loaded
    with claim_output(output, recipe.overwrite) if accelerator.is_main_process else contextlib.nullcontext():
        suite = benchmark_suite(recipe.eval)
        src = model_path(recipe)
        files = validate_checkpoint(src, trust_remote_code=recipe.trust_remote_code)
        check_recipe_against_checkpoint(recipe, files)
        loaded = load_checkpoint(files, dtype=DTYPES[recipe.dtype], trust_remote_code=recipe.trust_remote_code)
        data = load_training_data(data_spec(recipe.finetune.data), loaded.tokenizer)
        main = accelerator.is_main_process
        evaluator = Evaluator(suite, loaded.tokenizer, progress=recipe.progress) if main else None
        ctx = _Context(recipe, loaded, data, accelerator, _tail(recipe, evaluator, loaded), output)
        step = _qat if recipe.finetune.qat is not None else _lora
        with (atomic_directory(output, recipe.overwrite) if main else contextlib.nullcontext(None)) as tmp:
            original = ctx.tail.evaluate("original", loaded.model, src, reference=True) if main else None
            return step(ctx, tmp, original)


def _tail(recipe: Recipe, evaluator: Evaluator | None, loaded: LoadedModel) -> RunTail:
    reload = ReloadSettings(DTYPES[recipe.dtype], recipe.trust_remote_code) if recipe.eval.reload_check else None
    return RunTail(evaluator, gates_of(recipe.eval), run_meta(recipe, loaded.source, loaded.notes), reload)
