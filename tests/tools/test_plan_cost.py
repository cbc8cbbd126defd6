"""Method costs (:mod:`dsq.quantize.cost`): every registered method has one, the planner reads methods only
through it, and each config's facts follow its settings."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from dsq.quantize.cost import (
    EXPERT_BY_EXPERT,
    RANGE_CANDIDATES,
    STACKED_EXPERTS,
    ActivationRanges,
    BlockTraining,
    BnbBlocks,
    Hessians,
    Int8Weights,
    IntegerWeights,
    ScaleSearch,
    cost_of,
)
from dsq.quantize.method import METHODS

from dsq.run.recipe import load_recipe

PLAN_PACKAGE = Path(__file__).resolve().parents[2] / "dsq" / "tools" / "plan"


def config_of(*overrides: str):
    recipe = load_recipe(None, list(overrides))
    return recipe.quantize.config(getattr(torch, recipe.dtype))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_has_a_cost(name):
    config = config_of(f"quantize.method={name}")
    cost = cost_of(config)
    layout = cost.layout(config)
    assert layout.bits in (4, 8)
    assert (cost.calibration(config) is not None) == METHODS[name].calibrates(config)


def test_the_planner_names_no_method_config():
    """Method knowledge reaches the plan only through ``MethodCost``: no config class is named there."""
    names = {m.config.__name__ for m in METHODS.values()}
    for path in sorted(PLAN_PACKAGE.glob("*.py")):
        found = names & set(re.findall(r"\b\w+Config\b", path.read_text()))
        assert not found, f"{path.name} names {sorted(found)}"


def test_integer_methods_follow_their_settings():
    gptq = config_of("quantize.method=gptq", "quantize.weights.bits=4", "quantize.gptq.block_size=64",
                     "quantize.gptq.mse_scales=false", "quantize.gptq.expert_chunk=4")
    assert cost_of(gptq).layout(gptq) == IntegerWeights(gptq.scheme)
    assert cost_of(gptq).calibration(gptq) == Hessians(block_size=64, range_candidates=1, solve_batch=4)
    assert cost_of(gptq).rounding == STACKED_EXPERTS
    awq = config_of("quantize.method=awq", "quantize.awq.clip=true", "quantize.awq.grid=10")
    assert cost_of(awq).calibration(awq) == ScaleSearch(awq.search_tokens, 10, True, RANGE_CANDIDATES)
    rtn = config_of()
    assert cost_of(rtn).calibration(rtn) is None and cost_of(rtn).rounding == EXPERT_BY_EXPERT


def test_autoround_trains_blocks_with_its_steps_and_batch():
    config = config_of("quantize.method=autoround", "quantize.weights.bits=4", "quantize.autoround.steps=7",
                       "quantize.calibration.batch_size=4")
    cost = cost_of(config)
    assert cost.layout(config) == IntegerWeights(config.scheme)
    assert cost.calibration(config) == BlockTraining(steps=7, batch_size=4)
    assert cost.rounding == STACKED_EXPERTS


@pytest.mark.parametrize("activations, alpha, layout, calibration", [
    ("dynamic", "null", Int8Weights(False), None),
    ("dynamic", "0.5", Int8Weights(False), ActivationRanges(1)),
    ("static", "null", Int8Weights(True), ActivationRanges(1)),
    ("static", "0.5", Int8Weights(True), ActivationRanges(2)),
])
def test_w8a8_layout_and_passes_follow_its_activations(activations, alpha, layout, calibration):
    config = config_of("quantize.method=w8a8", f"quantize.w8a8.activations={activations}", f"quantize.w8a8.smoothquant_alpha={alpha}")
    assert cost_of(config).layout(config) == layout
    assert cost_of(config).calibration(config) == calibration


def test_bitsandbytes_blocks_follow_the_section():
    nf4 = config_of("quantize.method=bnb-nf4", "quantize.bnb.blocksize=128", "quantize.bnb.double_quant=true")
    assert cost_of(nf4).layout(nf4) == BnbBlocks(bits=4, blocksize=128, double_quant=True)
    int8 = config_of("quantize.method=bnb-int8")
    assert cost_of(int8).layout(int8).bits == 8 and not cost_of(int8).layout(int8).exact


def test_a_foreign_config_is_refused():
    with pytest.raises(TypeError, match="no quantization method"):
        cost_of(object())
