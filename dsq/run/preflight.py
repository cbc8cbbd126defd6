"""The recipe against the model, before any weight is read: context lengths and target patterns.

The checkpoint's own checks (config types, headers, tokenizer) are :mod:`dsq.core.config_checks`, :mod:`dsq.core.header_checks` and :mod:`dsq.core.tokenizer_check`
(:mod:`dsq.core.config_checks`, :mod:`dsq.core.header_checks`, :mod:`dsq.core.tokenizer_check`).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dsq.core.config_checks import ModelFacts, is_int, model_facts
from dsq.core.errors import RecipeError

if TYPE_CHECKING:
    from dsq.core.checkpoint import CheckpointFiles
    from dsq.run.recipe import Recipe

logger = logging.getLogger(__name__)

MAX_EXAMPLE_MODULES = 6
"""Module shapes named in an error about target patterns."""


def quantizable(facts: ModelFacts) -> tuple[tuple[str, str], ...]:
    """``(module name, kind)`` of every module dsq's target selection considers (``linear`` or
    ``experts``), in module order, from the model on the meta device."""
    from dsq.quantize.targets import TargetSpec, select_targets

    return tuple((d.name, d.kind) for d in select_targets(facts.model, TargetSpec()))

def recipe_lengths(recipe: Recipe) -> list[tuple[str, int]]:
    """Every sequence length the recipe runs the model at, as ``(recipe key, tokens)``.

    Args:
        recipe: A validated recipe.

    Returns:
        The lengths of the sections the run uses (calibration only for calibrated methods).
    """
    ev = recipe.eval
    lengths = [("eval.fidelity.seq_len", ev.fidelity.seq_len)]
    if ev.perplexity is not None:
        lengths.append(("eval.perplexity.context", ev.perplexity.context))
    if ev.speed is not None:
        lengths.append(("eval.speed.prompt_len + eval.speed.new_tokens", ev.speed.prompt_len + ev.speed.new_tokens))
    calibration = recipe.quantize.calibration_section if recipe.quantize is not None else None
    if calibration is not None:
        lengths.append(("quantize.calibration.seq_len", calibration.seq_len))
    if recipe.finetune is not None:
        lengths.append(("finetune.data.seq_len", recipe.finetune.data.seq_len))
    if recipe.export is not None:
        lengths.append(("export.validation.seq_lens", max(recipe.export.validation.seq_lens)))
    return lengths


def check_recipe_against_model(recipe: Recipe, facts: ModelFacts, config_path: Path) -> tuple[str, ...]:
    """Check a recipe against the model it runs on, before anything is loaded.

    Args:
        recipe: A validated recipe.
        facts: The model's facts (:func:`model_facts`).
        config_path: The model's config.json, named in messages.

    Returns:
        Notes for the run (an ``exclude`` pattern that matches no module).

    Raises:
        RecipeError: A sequence length exceeds ``max_position_embeddings`` (the key and both
            numbers are named), an ``include`` pattern matches no quantizable module (a few module
            names are listed), or the targets select no module at all.
    """
    check_recipe_lengths(recipe, facts.max_position_embeddings, config_path)
    _check_export(recipe, facts, config_path)
    if recipe.quantize is None:
        return ()
    return _check_targets(recipe, quantizable(facts), config_path)


def _check_export(recipe: Recipe, facts: ModelFacts, config_path: Path) -> None:
    """An ``export:`` section for a model dsq cannot export to ONNX fails before anything is loaded."""
    from dsq.export.support import onnx_unsupported

    model_type = getattr(getattr(facts.model, "config", None), "model_type", None)
    refusal = onnx_unsupported(model_type)
    if recipe.export is not None and refusal is not None:
        raise RecipeError(f"recipe key export: {config_path} is a {model_type} model; {refusal}. Remove the export section")


def check_recipe_lengths(recipe: Recipe, max_positions: int | None, config_path: Path) -> None:
    """Raise when a sequence length of the recipe exceeds the model's positions.

    Args:
        recipe: A validated recipe.
        max_positions: The model's ``max_position_embeddings`` (None: unknown, nothing checked).
        config_path: The model's config.json, named in messages.

    Raises:
        RecipeError: Naming every key too long, its value and ``max_position_embeddings``.
    """
    if max_positions is None:
        return
    too_long = [(key, value) for key, value in recipe_lengths(recipe) if value > max_positions]
    if too_long:
        listed = "; ".join(f"{key} is {value}" for key, value in too_long)
        raise RecipeError(
            f"{listed}: longer than the model's max_position_embeddings {max_positions} ({config_path}), "
            f"where its outputs are meaningless; lower it to at most {max_positions}"
        )


def _check_targets(recipe: Recipe, quantizable: Sequence[tuple[str, str]], config_path: Path) -> tuple[str, ...]:
    from dsq.quantize.targets import TargetSpec, decide

    t = recipe.quantize.targets
    spec = t.spec()
    model = config_path.parent
    for pattern in spec.include:
        alone = TargetSpec(include=(pattern,), lm_head=spec.lm_head, indexer=spec.indexer)
        if not any(decide(name, kind, alone)[0] for name, kind in quantizable):
            raise RecipeError(
                f"quantize.targets.include pattern {pattern!r} matches no quantizable module of {model} "
                f"(patterns are searched in module names such as {_module_examples(quantizable)})"
            )
    if not any(decide(name, kind, spec)[0] for name, kind in quantizable):
        raise RecipeError(
            f"quantize.targets selects no module of {model}: every module matched by include "
            f"{list(spec.include)} is excluded by {list(spec.exclude)} (or is the router, lm_head or a DSA indexer)"
        )
    notes = []
    for pattern in spec.exclude:
        if not any(decide(name, kind, TargetSpec(include=(pattern,), lm_head=True, indexer=True))[0] for name, kind in quantizable):
            notes.append(f"quantize.targets.exclude pattern {pattern!r} matches no quantizable module of {model}")
    return tuple(notes)


def _module_examples(quantizable: Sequence[tuple[str, str]]) -> str:
    shapes: list[str] = []
    for name, _ in quantizable:
        shape = re.sub(r"\.\d+(?=\.|$)", ".N", name)
        if shape not in shapes:
            shapes.append(shape)
    shown = ", ".join(shapes[:MAX_EXAMPLE_MODULES])
    return shown + (", ..." if len(shapes) > MAX_EXAMPLE_MODULES else "")


def check_recipe_against_checkpoint(recipe: Recipe, files: CheckpointFiles) -> tuple[str, ...]:
    """Check ``recipe`` against the model of a validated checkpoint (no weight is read).

    A run's entry point: call it before the model is loaded. Notes are also logged.

    Args:
        recipe: A validated recipe.
        files: The checkpoint (:func:`dsq.core.checkpoint.validate_checkpoint`).

    Returns:
        Notes for the run (see :func:`check_recipe_against_model`).

    Raises:
        CheckpointError: transformers cannot build the model config.json describes.
        RecipeError: The recipe does not fit the model.
    """
    from dsq.core.checkpoint import CONFIG_NAME
    from dsq.core.layout import SUPPORTED_MODEL_TYPES

    config_path = files.root / CONFIG_NAME
    if files.model_type not in SUPPORTED_MODEL_TYPES:  # custom code: only what config.json says
        positions = files.config.get("max_position_embeddings")
        check_recipe_lengths(recipe, positions if is_int(positions) else None, config_path)
        return ()
    notes = check_recipe_against_model(recipe, model_facts(files.config, config_path), config_path)
    for note in notes:
        logger.warning("%s", note)
    return notes
