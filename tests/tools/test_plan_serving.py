"""``dsq plan``'s serving memory: the weights plus the KV cache of one sequence at 4k, 32k and 128k tokens."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsq.run.recipe import load_recipe
from dsq.tools.plan import plan_checkpoint

PUBLIC = Path(__file__).resolve().parents[2] / "dsq" / "assets" / "public_configs"


def _config(name: str) -> dict:
    return json.loads((PUBLIC / name / "config.json").read_text())


def test_mla_caches_the_latent_and_the_rope_key():
    plan = plan_checkpoint(PUBLIC / "deepseek-v3", load_recipe(None, ["dtype=bfloat16", "kv_cache.dtype=fp8_e4m3"]))
    c = _config("deepseek-v3")
    per_token = c["num_hidden_layers"] * (c["kv_lora_rank"] + c["qk_rope_head_dim"])  # 61 x 576
    source, recipe = plan.serving.rows
    assert source.kv_bytes_per_token == 2 * per_token and source.kv_cache == "bfloat16 KV cache"
    assert recipe.kv_bytes_per_token == per_token and recipe.kv_cache == "fp8_e4m3 per-tensor KV cache"
    assert recipe.weight_bytes == plan.schemes[-1].tensor_bytes
    assert [t for t, _, _ in recipe.contexts] == [4096, 32768, 131072]
    assert all(total == recipe.weight_bytes + t * per_token for t, _, total in recipe.contexts)
    assert "## Serving memory, batch 1" in plan.to_markdown()


def test_gqa_caches_kv_heads_and_offers_an_int8_cache_when_the_recipe_has_none():
    plan = plan_checkpoint(PUBLIC / "deepseek-r1-distill-qwen-1.5b", load_recipe(None, ["dtype=bfloat16"]))
    c = _config("deepseek-r1-distill-qwen-1.5b")
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    per_token = c["num_hidden_layers"] * c["num_key_value_heads"] * 2 * head_dim
    labels = [r.label for r in plan.serving.rows]
    assert labels[-1].endswith("+ kv_cache: int8")
    assert [r.kv_bytes_per_token for r in plan.serving.rows] == [2 * per_token, 2 * per_token, per_token]
    assert plan.to_dict()["serving"]["rows"][2]["kv_cache"] == "int8 per-tensor KV cache"


@pytest.mark.parametrize("kv", [[], ["kv_cache.dtype=int8"]])
def test_deepseek_v4_is_not_estimated_and_the_notes_say_why(kv):
    plan = plan_checkpoint(PUBLIC / "deepseek-v4-flash", load_recipe(None, ["dtype=bfloat16", *kv]))
    assert plan.serving is None
    note = next(n for n in plan.notes if n.startswith("serving memory"))
    assert "deepseek_v4" in note and ("refuses the recipe's kv_cache" in note) == bool(kv)
    assert "## Serving memory" not in plan.to_markdown()
