"""Tier 3: the bundled recipes end to end on the bundled tiny DeepSeek-V3, with accuracy gates."""
import json
from pathlib import Path

import pytest

from dsq.cli import main
from dsq.run.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_model_is_a_trained_deepseek_v3():
    from dsq.core.checkpoint import bundled_model_path, inspect_checkpoint

    files = inspect_checkpoint(bundled_model_path())
    cfg = files.config
    assert cfg["model_type"] == "deepseek_v3"
    assert cfg["q_lora_rank"] and cfg["n_routed_experts"] >= 8 and cfg["num_experts_per_tok"] == 2
    assert cfg["n_shared_experts"] == 1 and cfg["first_k_dense_replace"] == 1
    assert sum(p.stat().st_size for p in files.weight_files) < 21_000_000


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["demo.yaml", "int8_channel.yaml"])
def test_bundled_recipe_passes_its_gates(tmp_path, capsys, recipe):
    out = tmp_path / "art"
    code = main(["run", str(ROOT / "recipes" / recipe), f"output={out}", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    original = report["original"]
    assert original["ppl"]["ppl"] < 0.05 * 2048  # a trained model: far below the vocabulary size
    assert original["mc"]["acc"] > 0.35  # chance is 0.25
    cand = report["candidates"][0]
    assert cand["extra"]["reload_check"]["passed"] is True
    assert report["passed"] is True and len(report["gates"]) >= 1
    recipe_obj = load_recipe(ROOT / "recipes" / recipe)
    if recipe_obj.quantize.weights.bits == 4:
        assert cand["extra"]["quantization"]["quantized_bytes_ratio_vs_fp16"] <= 0.30
    kept = {k["name"] for k in cand["extra"]["quantization"]["kept"]}
    assert kept == {"lm_head"}  # every other Linear and every expert tensor is quantized


@pytest.mark.slow
@pytest.mark.parametrize("recipe, overrides", [
    ("gptq_int4_g128.yaml", ["quantize.calibration.samples=64"]),
    ("awq_int4_g128.yaml", ["quantize.calibration.samples=32"]),
    ("w8a8_smoothquant.yaml", ["quantize.calibration.samples=16", "eval.perplexity.max_tokens=8192", "eval.multiple_choice.limit=100"]),
    ("bnb_nf4.yaml", []),
])
def test_calibrated_and_bnb_recipes_pass_their_gates(tmp_path, capsys, recipe, overrides):
    out = tmp_path / "art"
    code = main(["run", str(ROOT / "recipes" / recipe), f"output={out}", *overrides, "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err + captured.out
    report = json.loads((out / "report.json").read_text())
    cand = report["candidates"][0]
    assert report["passed"] is True
    q = cand["extra"]["quantization"]
    kept = {k["name"] for k in q["kept"]}
    if recipe.startswith("bnb"):
        # bitsandbytes has no fused-expert layer: the experts are kept, and the report says so
        assert "lm_head" in kept and any(name.endswith("mlp.experts") for name in kept)
        assert "KEPT bnb-nf4: model.layers.1.mlp.experts (fused MoE experts" in captured.out
        assert cand["extra"]["reload_check"]["passed"] is True
    else:
        assert kept == {"lm_head"}
        counts = q["calibration"]["expert_routed_tokens"]
        assert len(counts) == 3 and all(len(c) == 8 for c in counts.values())
    if recipe.startswith(("gptq", "awq")):
        assert cand["extra"]["reload_check"]["passed"] is True
