"""``plan_checkpoint``: a recipe against a checkpoint, from config.json and safetensors headers alone."""
from __future__ import annotations

import math

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dsq.core.checkpoint import (
    CONFIG_NAME,
    PICKLE_SUFFIXES,
    SAFE_WEIGHTS_INDEX_NAME,
    inspect_checkpoint,
)
from dsq.core.config_checks import model_facts as checked_model_facts
from dsq.core.errors import CheckpointError
from dsq.core.layout import SUPPORTED_MODEL_TYPES
from dsq.quantize.cost import BlockTraining, IntegerWeights
from dsq.run.preflight import check_recipe_against_model
from dsq.run.recipe import Recipe, load_recipe

from .artifact import (
    DTYPE_BYTES,
    FloatWeights,
    artifact_bytes,
    comparison_layouts,
    scheme_row,
)
from .facts import ModelFacts, model_facts, parameter_counts
from .flops import TimeEstimate, calibration_flops, throughputs
from .memory import Quantization, layer_plans, memory_estimates
from .render import format_bytes, format_params
from .results import Plan
from .serving import serving_plan
from .source import MAX_EXAMPLES, LoadedSource, SourceBytes, loaded_source, source_bytes
from .statistics import CalibrationRun
from dsq.core.checkpoint import checkpoint_dir, read_config


def read_plan_config(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint directory and its parsed, checked config.json (no weight is read).

    Args:
        path: the checkpoint directory.

    Returns:
        ``(absolute directory, config)``.

    Raises:
        CheckpointError: the directory or its config.json is missing or unusable, or the model type
            is not supported (the message names the path and the key).
    """
    root = checkpoint_dir(path)
    config = read_config(root)
    config_path = root / CONFIG_NAME
    if config["model_type"] not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{config_path}: unsupported model_type {config['model_type']!r}; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return root, config


def _weight_headers(root: Path) -> tuple[Any, ...]:
    """The validated safetensors headers of the checkpoint's weight files (empty without weights)."""
    names = [p.name for p in root.iterdir() if p.is_file()]
    has_weights = any(n.endswith((".safetensors", *PICKLE_SUFFIXES)) or n == SAFE_WEIGHTS_INDEX_NAME for n in names)
    return inspect_checkpoint(root).headers if has_weights else ()


def _quantization(recipe: Recipe, processes: int = 1) -> tuple[Quantization, Any]:
    """The recipe's quantization as the estimates need it, and its target spec."""
    import torch

    from dsq.quantize import TargetSpec
    from dsq.quantize.cost import cost_of

    dtype_name = recipe.dtype
    section = recipe.quantize
    if section is None:  # the comparison rows still follow dsq's default targets
        return Quantization(FloatWeights(), None, None, None, dtype_name, DTYPE_BYTES[dtype_name]), TargetSpec()
    config = section.config(getattr(torch, dtype_name))  # the recipe allows float32 and bfloat16
    cost = cost_of(config)
    calibration = cost.calibration(config)
    data = section.calibration_section
    whole = CalibrationRun(data.samples, data.seq_len, data.batch_size) if calibration is not None else None
    run = whole
    if whole is not None and processes > 1:  # the largest share: whole batches, the first ranks one more
        share = min(data.samples, math.ceil(whole.batches / processes) * data.batch_size)
        run = CalibrationRun(share, data.seq_len, data.batch_size)
    q = Quantization(cost.layout(config), cost.rounding, calibration, run, dtype_name, DTYPE_BYTES[dtype_name], whole_run=whole)
    return q, section.targets.spec()


def _recipe_line(recipe: Recipe, source: str, q: Quantization) -> str:
    """One line: where the recipe came from and what it does."""
    section = recipe.quantize
    if section is None:
        return f"{source}: no quantization, dtype {recipe.dtype}"
    t = section.targets
    targets = f"include {t.include}, exclude {t.exclude}, lm_head {str(t.lm_head).lower()}"
    line = f"{source}: method {section.method}, dtype {recipe.dtype}, targets {targets}"
    match q.layout:
        case IntegerWeights(scheme=scheme):
            line += f", {scheme.describe()}"
            if t.schemes:
                line += f" where none of {len(t.schemes)} per-module scheme rules (counted in the bytes) applies"
    if q.run is not None:
        line += f", calibration {q.run.samples} x {q.run.seq_len} tokens (batch {q.run.batch_size})"
    match q.calibration:
        case BlockTraining(steps=steps):
            line += f", {steps} training steps per block"
    return line


def _attention_note(facts: ModelFacts, q: Quantization) -> str | None:
    """What the estimates count of sparse and compressed attention and of hyper-connection streams (None: nothing special)."""
    compressed = sorted({layer.compress_rate for layer in facts.layers if layer.compress_rate})
    indexed = any(layer.indexer is not None for layer in facts.layers)
    if not compressed and not indexed and facts.residual_streams == 1:
        return None
    counted = ["every score over the batch's own tokens (eager attention; a sliding window or an indexer's top-k only masks them)"]
    if compressed:
        counted.append("the compressed KV entries the layer derives from them (" +
                       ", ".join(f"1 per {r} tokens" for r in compressed) + ")")
    if indexed:
        counted.append("the indexers' scores")
    listed = counted[0] if len(counted) == 1 else ", ".join(counted[:-1]) + " and " + counted[-1]
    note = "no KV cache is counted: calibration runs without one (use_cache=False); the forward workspace counts " + listed
    if facts.residual_streams > 1 and q.run is not None:
        note += f"; calibration activations are {facts.residual_streams} hyper-connection streams x hidden wide"
    return note


def _notes(config: Mapping[str, Any], facts: ModelFacts, source: SourceBytes, q: Quantization,
           recipe: Recipe) -> tuple[str, ...]:
    notes = []
    quant_method = (config.get("quantization_config") or {}).get("quant_method")
    if quant_method not in (None, "fp8"):
        notes.append(f"the checkpoint is already quantized ({quant_method}): the plan describes its unquantized model; "
                     "plan the original checkpoint instead")
    if not source.from_headers:
        notes.append("no weight files: planned from config.json alone; source bytes are computed from the config")
    if source.unused is not None:
        how = "in the checkpoint" if source.from_headers else "expected in the published checkpoint (estimated from num_nextn_predict_layers)"
        notes.append(
            f"tensors {how} that the model does not use ({', '.join(source.unused.examples)}): "
            f"{format_params(source.unused.parameters)} parameters, {format_bytes(source.unused.bytes)}; counted separately, "
            "not loaded, not quantized, not written to the artifact"
        )
    if source.missing:
        notes.append(f"model tensors missing from the headers or of another size: {', '.join(source.missing[:MAX_EXAMPLES])}")
    attention = _attention_note(facts, q)
    if attention is not None:
        notes.append(attention)
    if q.run is not None:
        notes.append("calibration time is an estimate: FLOPs of the dominant matmuls divided by the throughput; "
                     "reading the checkpoint and Python overhead are not counted")
    if recipe.finetune is not None:
        notes.append("the recipe's finetune: section is not planned (training memory and time)")
    if recipe.quantize is not None:
        notes.append("the in-memory path also reloads the artifact with transformers for the reload check "
                     "(eval.reload_check) after quantizing; that copy is not counted")
    return tuple(notes)


def _check_recipe(recipe: Recipe, root: Path, config: Mapping[str, Any]) -> None:
    check_recipe_against_model(recipe, checked_model_facts(config, root / CONFIG_NAME), root / CONFIG_NAME)


def plan_checkpoint(path: str | Path, recipe: Recipe | None = None, *, tflops: float | None = None, processes: int = 1) -> Plan:
    """Plan a recipe on a checkpoint without loading any tensor data.

    Args:
        path: the checkpoint directory (config.json, and safetensors weights when present).
        recipe: the recipe (None: every default).
        tflops: throughput for the calibration time (None: the GPU and CPU defaults of :mod:`.flops`).
        processes: processes sharing calibration (``torchrun --nproc_per_node N``): memory is per process (each
            holds its share of the batches' activations and every statistic), time is the work of one of them.

    Returns:
        The :class:`Plan`.

    Raises:
        CheckpointError: the directory, its config.json or its weight files cannot be used,
            or they disagree (the message names the file, key or tensor).
        RecipeError: the recipe does not fit the model (a sequence length beyond its positions,
            an include pattern that matches no module).
    """
    source_name = "recipe" if recipe is not None else "defaults"
    recipe = recipe if recipe is not None else load_recipe(None)
    root, config = read_plan_config(path)
    headers = _weight_headers(root)
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    q, spec = _quantization(recipe, processes)
    facts = model_facts(root, config, spec)
    _check_recipe(recipe, root, config)
    return _assemble(root, config, recipe, facts, q, headers, source_name, throughputs(tflops), processes)


def _assemble(root: Path, config: Mapping[str, Any], recipe: Recipe, facts: ModelFacts, q: Quantization,
              headers: Sequence[Any], source_name: str, rates: tuple[tuple[str, float], ...], processes: int = 1) -> Plan:
    quantized = artifact_bytes(facts, q.layout, q.dtype_bytes)
    layers = layer_plans(facts, q, quantized)
    source = source_bytes(facts, headers)
    rows = [scheme_row(facts, label, layout, kept) for label, layout, kept in comparison_layouts(q.dtype_name)]
    rows.append(scheme_row(facts, f"recipe: {recipe.quantize.method if recipe.quantize else 'no quantization'}", q.layout, q.dtype_name))
    kv = recipe.kv_cache.scheme() if recipe.kv_cache is not None else None
    serving, serving_why = serving_plan(config, (f"source ({source.storage})", source.tensor_bytes),
                                        (rows[-1].label, rows[-1].tensor_bytes), kv, q.dtype_name, q.dtype_bytes)
    loaded: LoadedSource = loaded_source(facts, headers, source, q.dtype_name)
    in_memory, streaming, accelerator = memory_estimates(facts, q, quantized, layers, loaded)
    whole = q.whole_run if q.whole_run is not None else q.run
    # every part of calibration is shared out: the batches' forwards and statistics, and the solves
    flops = tuple((what, f / processes) for what, f in calibration_flops(facts, q.calibration, whole, quantizes=recipe.quantize is not None))
    return Plan(
        checkpoint=str(root), model_type=config["model_type"], architecture=facts.architecture, config_only=not headers,
        recipe=_recipe_line(recipe, source_name, q), method=recipe.quantize.method if recipe.quantize else None,
        parameters=parameter_counts(facts), layers=layers, source=source, schemes=tuple(rows), in_memory=in_memory,
        streaming=streaming, accelerator=accelerator, time=TimeEstimate(flops, rates),
        notes=_notes(config, facts, source, q, recipe) + _process_notes(q, processes) + ((serving_why,) if serving_why else ()),
        serving=serving,
    )


def _process_notes(q: Quantization, processes: int) -> tuple[str, ...]:
    if processes == 1:
        return ()
    share = f"{q.run.samples} of {q.whole_run.samples} calibration sequences" if q.run is not None else "no calibration"
    return (
        f"{processes} processes (torchrun --nproc_per_node {processes}): the figures are per process; each loads the model "
        f"(in memory) or one layer at a time (streaming), holds its share of the activations ({share}) and every "
        "statistic of a layer (combined over the processes), and does 1/N of the calibration work",
    )
