"""A quantize run over several processes: ``torchrun --nproc_per_node N -m dsq run RECIPE``.

Every process loads the model (in memory) or streams it layer by layer, and calibrates on its share of
the batches; statistics are combined and the solves dealt out (:mod:`dsq.core.ranks`), so every process
ends with the same quantized weights. Only the main process (rank 0) claims the output, evaluates,
writes the artifact and reports; the others return once calibration is done. The artifact is the one a
single process writes.
"""
from __future__ import annotations

import torch

from dsq.core.checkpoint import CheckpointFiles, validate_checkpoint
from dsq.core.errors import RecipeError
from dsq.core.loading import load_checkpoint, load_tokenizer
from dsq.core.ranks import SINGLE, Ranks, join_launched_group, launched_ranks, leave_group
from dsq.quantize.method import split_refusal
from dsq.quantize.streaming import quantize_streaming
from dsq.run.preflight import check_recipe_against_checkpoint
from dsq.run.recipe import Recipe
from dsq.run.steps import DTYPES, QuantizeStep, model_path
from dsq.run.streaming import StreamingDecision, decide_streaming


def join_ranks(recipe: Recipe) -> Ranks:
    """The processes of this run: :data:`~dsq.core.ranks.SINGLE` without a launcher; with ``WORLD_SIZE`` > 1
    the recipe must calibrate with a method that splits calibration, then the process group is joined.

    Raises:
        RecipeError: several processes for a recipe they cannot share (every rank raises it, before any
            collective, so each exits 2).
    """
    world = launched_ranks()
    if world <= 1:
        return SINGLE
    section = recipe.quantize
    if section is None:
        raise RecipeError(f"{world} processes share a quantize section's calibration; this recipe has none (run it in one process)")
    if refusal := split_refusal(section.config(DTYPES[recipe.dtype]), world):
        raise RecipeError(refusal)
    return join_launched_group(section.device)


def checked_source(recipe: Recipe, ranks: Ranks) -> tuple[CheckpointFiles, StreamingDecision]:
    """What every rank does before loading: seed, the checkpoint checked against the recipe, and the main
    process's streaming decision."""
    torch.manual_seed(recipe.seed)
    files = validate_checkpoint(model_path(recipe), trust_remote_code=recipe.trust_remote_code)
    check_recipe_against_checkpoint(recipe, files)  # the recipe against the model, before anything is loaded
    return files, agree_on_streaming(ranks, decide_streaming(recipe.streaming, files, DTYPES[recipe.dtype]))


def agree_on_streaming(ranks: Ranks, decision: StreamingDecision) -> StreamingDecision:
    """The main process's streaming decision on every rank (free memory, which an automatic decision reads,
    differs from process to process)."""
    if not ranks.several:
        return decision
    flag = ranks.broadcast_(torch.tensor([int(decision.stream)]), 0)
    stream = bool(flag.item())
    return decision if stream == decision.stream else StreamingDecision(stream, "the main process decided: " + decision.reason)


def check_kv_cache_run(recipe: Recipe, decision: StreamingDecision) -> None:
    """A ``kv_cache:`` section needs the model in memory (checked before loading).

    Raises:
        RecipeError: this run streams the checkpoint.
    """
    if recipe.kv_cache is None:
        return
    if decision.stream:
        raise RecipeError(
            f"kv_cache: the KV cache is calibrated on the whole quantized model in memory, but this run streams the "
            f"checkpoint one decoder layer at a time ({decision.reason}); run it on a machine where the model fits "
            "with streaming: false, or remove 'kv_cache'"
        )


def calibrate_share(recipe: Recipe, ranks: Ranks) -> None:
    """A non-main rank's run: the same checks and decisions as the main one, then its share of calibration;
    it writes nothing."""
    dtype = DTYPES[recipe.dtype]
    files, decision = checked_source(recipe, ranks)
    check_kv_cache_run(recipe, decision)  # the main rank refuses the same run: every rank stops
    tokenizer = load_tokenizer(files.root, trust_remote_code=recipe.trust_remote_code)
    step = QuantizeStep.from_recipe(recipe, tokenizer)
    if decision.stream:
        quantize_streaming(files, None, step.config, calibration=step.calibration, dtype=dtype,
                           trust_remote_code=recipe.trust_remote_code, progress=False, device=step.device)
    else:
        loaded = load_checkpoint(files, dtype=dtype, trust_remote_code=recipe.trust_remote_code)
        step.apply(loaded.model, progress=False)
    leave_group()
