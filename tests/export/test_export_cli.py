"""``dsq export`` and the recipe ``export:`` section end to end: exit codes, files, report rows."""
from __future__ import annotations

import json

import pytest

from dsq.cli import main

HELD_OUT = "def add(a, b):\n    return a + b\n\n" * 40


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def eval_data(tmp_path):
    text = tmp_path / "held.txt"
    text.write_text(HELD_OUT)
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "def add(a, b):\n", "choices": ["    return a + b\n", " zzz"], "gold": 0}) + "\n")
    return text, mc


def _recipe(tmp_path, model, eval_data, method_block: str, export_block: str = "export: {}\n"):
    text, mc = eval_data
    p = tmp_path / "recipe.yaml"
    p.write_text(
        f"model: {model}\noutput: {tmp_path / 'out'}\nprogress: false\n{method_block}{export_block}"
        f"eval:\n  perplexity: {{data: {text}, context: 64, stride: 32}}\n"
        f"  multiple_choice: {{data: {mc}}}\n  fidelity: {{seq_len: 32, max_tokens: 128}}\n"
        "  speed: {prompt_len: 16, new_tokens: 4, repeats: 1}\n"
        "  gates: {max_ppl_increase_pct: 50}\n"
    )
    return p


def test_recipe_export_section_adds_a_validated_onnx_row(tmp_path, tiny_deepseek_v3, eval_data, capsys):
    recipe = _recipe(tmp_path, tiny_deepseek_v3, eval_data, "quantize: {weights: {bits: 4, group_size: 32}}\n")
    code, out, err = run(capsys, "run", recipe)
    assert code == 0, err
    art = tmp_path / "out"
    assert (art / "onnx" / "model.onnx").is_file() and (art / "onnx" / "export_manifest.json").is_file()
    report = json.loads((art / "report.json").read_text())
    torch_row, onnx_row = report["candidates"]
    assert onnx_row["name"] == "rtn-int4-g32-onnx"
    facts = onnx_row["extra"]["onnx"]
    assert facts["path"] == "onnx"  # relative to the output: the run's staging directory is gone
    assert facts["max_abs_logit_diff"] <= 1e-3 and facts["greedy_tokens_equal"] is True
    assert abs(facts["ppl_vs_torch_pct"]) < 0.01
    assert onnx_row["fidelity"]["top1_agreement"] == pytest.approx(torch_row["fidelity"]["top1_agreement"], abs=0.02)
    assert onnx_row["speed"]["prefill_tokens_per_s"] > 0 and torch_row["speed"]["decode_tokens_per_s"] > 0
    assert "decode tok/s" in out and "rtn-int4-g32-onnx" in out
    # the artifact's own weight bytes exclude the ONNX copy
    assert torch_row["weight_bytes_disk"] < onnx_row["weight_bytes_disk"] * 1.5


def test_export_of_bitsandbytes_method_is_a_recipe_error(tmp_path, tiny_deepseek_v3, eval_data, capsys):
    recipe = _recipe(tmp_path, tiny_deepseek_v3, eval_data, "quantize: {method: bnb-nf4}\n")
    code, _, err = run(capsys, "run", recipe)
    assert code == 2 and "'export'" in err and "bnb-nf4" in err and "has no ONNX form" in err
    assert not (tmp_path / "out").exists()


def test_dsq_export_of_a_dsq_artifact_checks_it_against_dsq_forward(tmp_path, tiny_checkpoint, capsys):
    from dsq.quantize import PerGroup, WeightScheme
    from dsq.tools.testing import make_rtn_artifact

    art = make_rtn_artifact(tiny_checkpoint("deepseek_v2"), tmp_path / "int8", WeightScheme(8, PerGroup(64), False))
    code, out, err = run(capsys, "export", art, "-q")
    assert code == 0, err
    assert "max |delta logit|" in out and "identical greedy tokens" in out
    manifest = json.loads((tmp_path / "int8-onnx" / "export_manifest.json").read_text())
    assert manifest["ops"]["com.microsoft::MatMulNBits"] > 0 and manifest["validation"]["passed"]
    routed = manifest["quantized_modules"]["routed_experts"]  # experts exported, from the artifact's integers
    assert routed and all(r["form"] == "sparse" for r in routed.values())
    code, _, err = run(capsys, "export", art, "-q")  # again, without --overwrite
    assert code == 2 and "already exists" in err


def test_dsq_export_evaluate_writes_a_report(tmp_path, tiny_checkpoint, capsys):
    code, out, err = run(capsys, "export", tiny_checkpoint("llama"), "-o", tmp_path / "x", "--evaluate", "-q")
    assert code == 0, err
    report = json.loads((tmp_path / "x" / "report.json").read_text())
    row = report["candidates"][0]
    assert row["name"].endswith("-onnx") and row["fidelity"]["top1_agreement"] == 1.0
    assert abs(row["extra"]["onnx"]["ppl_vs_torch_pct"]) < 1e-3


@pytest.mark.parametrize("case", ["missing", "bnb"])
def test_dsq_export_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_checkpoint, capsys, case):
    import shutil

    src = tmp_path / "model"
    if case == "bnb":
        shutil.copytree(tiny_checkpoint("llama"), src)
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
        (src / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "export", src, "-o", tmp_path / "out")
    assert code == 2
    assert ("no config.json" in err) if case == "missing" else ("'bitsandbytes' has no ONNX form" in err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, default", [("dense_experts", False), ("absorb_mla", True)])
def test_recipe_export_section_carries_the_graph_form(key, default):
    from dsq.core.errors import RecipeError
    from dsq.run.export_step import export_config
    from dsq.run.recipe import load_recipe

    assert getattr(export_config(load_recipe(None, ["export={}"]).export), key) is default
    assert getattr(export_config(load_recipe(None, [f"export={{{key}: {str(not default).lower()}}}"]).export), key) is (not default)
    with pytest.raises(RecipeError, match=f"export.{key}"):
        load_recipe(None, [f"export={{{key}: maybe}}"])


def test_recipe_export_opset_is_23_or_21_and_nothing_else():
    from dsq.core.errors import RecipeError
    from dsq.run.export_step import export_config
    from dsq.run.recipe import load_recipe

    assert export_config(load_recipe(None, ["export={}"]).export).opset == 23
    assert export_config(load_recipe(None, ["export={opset: 21}"]).export).opset == 21
    with pytest.raises(RecipeError, match="export.opset"):
        load_recipe(None, ["export={opset: 22}"])


def test_dsq_export_opset_21_is_recorded_and_a_bad_opset_exits_2(tmp_path, tiny_checkpoint, capsys):
    code, _, err = run(capsys, "export", tiny_checkpoint("qwen2"), "-o", tmp_path / "o21", "--opset", "21", "-q")
    assert code == 0, err
    manifest = json.loads((tmp_path / "o21" / "export_manifest.json").read_text())
    assert manifest["opset"] == 21 and "Attention" not in manifest["ops"] and manifest["validation"]["passed"]
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tiny_checkpoint("qwen2")), "-o", str(tmp_path / "o22"), "--opset", "22"])
    assert exc.value.code == 2 and "--opset" in capsys.readouterr().err
    assert not (tmp_path / "o22").exists()
