"""Tier 3: the QAT and LoRA recipes end to end on the bundled tiny DeepSeek-V3 (short trainings)."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dsq.cli import main
from dsq.quantize.artifact_load import load_artifact

from cpu_paths import describe

ROOT = Path(__file__).resolve().parents[1]
# a few steps and a small evaluation: these tests check the plumbing, benchmarks/ measures quality
SHORT = [
    "finetune.training.max_steps=4", "finetune.training.batch_size=4", "finetune.training.save_every=2",
    "finetune.data.seq_len=128", "eval.perplexity.max_tokens=4096", "eval.multiple_choice.limit=40",
    "eval.fidelity.max_tokens=1024",
]


def _run(recipe: str, out: Path, *overrides: str) -> tuple[int, str, dict | None]:
    code = main(["run", str(ROOT / "recipes" / recipe), f"output={out}", *SHORT, *overrides, "-q"])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return code, "", report


@pytest.mark.slow
@pytest.mark.parametrize("recipe, overrides", [
    ("qat_int4_g128.yaml", []),
    ("qat_int8_channel.yaml", []),
    ("qat_from_gptq_int4_g128.yaml", ["quantize.calibration.samples=16"]),
])
def test_qat_recipe_lands_in_the_ptq_artifact(tmp_path, capsys, recipe, overrides):
    out = tmp_path / "art"
    code, _, report = _run(recipe, out, "eval.gates.max_ppl_increase_pct=null", "eval.gates.min_top1_agreement=null", *overrides)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    start, qat = report["candidates"]
    assert start["name"].startswith("qat step 0 (") and qat["name"].startswith("qat-")
    assert qat["extra"]["reload_check"]["passed"] is True
    training = qat["extra"]["training"]
    assert training["steps"] == 4 and training["world_size"] == 1 and training["tokens_seen"] == 4 * 4 * 128
    q = qat["extra"]["quantization"]
    assert {k["name"] for k in q["kept"]} == {"lm_head"}  # every expert and Linear trained and quantized
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    # dsq's own reader gives the logits the report measured
    model = load_artifact(out).model.eval()
    ids = torch.randint(3, 2000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    checkpoints = out.with_name(out.name + ".checkpoints")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000002", "step-0000004"]


@pytest.mark.slow
@pytest.mark.slow
def test_qat_model_exports_to_onnx_for_serving(tmp_path, capsys):
    out = tmp_path / "art"
    code, _, report = _run("qat_int4_g128.yaml", out, "export={evaluate: false}", "eval.gates.max_ppl_increase_pct=null",
                           "eval.gates.min_top1_agreement=null")
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "onnx" / "export_manifest.json").read_text())
    assert manifest["validation"]["passed"] and manifest["validation"]["max_abs_logit_diff"] <= 1e-3
    assert manifest["ops"]["com.microsoft::MatMulNBits"] > 0 and manifest["quantized_modules"]["routed_experts"]
    assert [c["name"] for c in report["candidates"]][-1].startswith("qat-")  # no ONNX row without evaluate


def test_resume_continues_a_recipe_from_its_checkpoint(tmp_path, capsys):
    out = tmp_path / "art"
    assert _run("qat_int4_g128.yaml", out, "finetune.training.max_steps=4")[0] == 0
    shutil.rmtree(out.with_name("art.checkpoints") / "step-0000004")
    code, _, report = _run("qat_int4_g128.yaml", out, "overwrite=true")
    assert code == 0, capsys.readouterr().err
    assert report["candidates"][1]["extra"]["training"]["resumed_from_step"] == 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_recipe_under_two_processes(tmp_path):
    out = tmp_path / "art"
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", "29544", "-m", "dsq", "run",
           str(ROOT / "recipes" / "qat_int4_g128.yaml"), f"output={out}", *SHORT, "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    training = json.loads((out / "report.json").read_text())["candidates"][1]["extra"]["training"]
    assert training["world_size"] == 2 and training["tokens_seen"] == 4 * 4 * 128 * 2
    d = training["rank_weight_digests"]
    assert len(d) == 2 and d[0] == d[1]
    assert done.stdout.count("artifact:") == 1  # only the main process reports


def test_finetune_recipe_errors_name_the_section(tmp_path):
    from dsq.core.errors import RecipeError
    from dsq.run.recipe import load_recipe

    with pytest.raises(RecipeError, match="quantize.method must be one of rtn, gptq, awq"):
        load_recipe(ROOT / "recipes" / "qlora_nf4_domain.yaml", ["finetune.lora=null", "finetune.qat.learnable_scales=false"])
    with pytest.raises(RecipeError, match="exactly one of 'finetune.qat' and 'finetune.lora'"):
        load_recipe(ROOT / "recipes" / "qat_int4_g128.yaml", ["finetune.lora.r=4"])
    with pytest.raises(RecipeError, match="nothing to do"):
        load_recipe(None, ["quantize=null"])
    with pytest.raises(RecipeError, match="unknown key 'finetune.training.epochs'"):
        load_recipe(ROOT / "recipes" / "qat_int4_g128.yaml", ["finetune.training.epochs=3"])


def test_missing_training_data_exits_2_without_artifact(tmp_path, capsys):
    out = tmp_path / "art"
    code = main(["run", str(ROOT / "recipes" / "qat_int4_g128.yaml"), f"output={out}",
                 f"finetune.data.train={tmp_path / 'nope.jsonl'}", "-q"])
    assert code == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".art.partial-*"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lora_domain.yaml", "qlora_nf4_domain.yaml", "qlora_int4_domain.yaml"])
def test_lora_recipe_saves_adapter_and_merged_artifact(tmp_path, capsys, recipe):
    from dsq.finetune.lora import load_adapter, read_manifest

    out = tmp_path / "art"
    code, _, report = _run(recipe, out, "eval.gates.max_ppl_increase_pct=null", "finetune.training.lr=3e-3")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    names = [c["name"] for c in report["candidates"]]
    quantized = recipe != "lora_domain.yaml"
    assert names[-1].startswith("lora-merged-") and names[-2].startswith("lora-")
    assert (len(names) == 3) == quantized  # a quantized base gets its own row
    adapter = report["candidates"][-2]
    lora = adapter["extra"]["lora"]
    assert 0 < lora["trainable_share"] < 0.1
    base = report["candidates"][0] if quantized else report["original"]
    # a few steps already lower the domain perplexity. On a bnb-nf4 base the adapter model runs on
    # bitsandbytes' dequantize path on every CPU (the base row: bitsandbytes' default, its AVX512-BF16
    # kernel where detected); training through that kernel's repacked weights had no backward and
    # gave 71.8 against the base's 59.7
    assert adapter["ppl"]["ppl"] < base["ppl"]["ppl"], (adapter["ppl"]["ppl"], base["ppl"]["ppl"], describe())
    merged = report["candidates"][-1]
    assert merged["extra"]["reload_check"]["passed"] is True
    merge = merged["extra"]["merge"]
    if quantized:
        drift = merge["drift_vs_adapter"]
        assert 0.8 < drift["top1_agreement"] <= 1.0 and abs(drift["ppl_increase_pct"]) < 5
        assert merge["modules"] and all(m["scheme"] for m in merge["modules"])
    else:
        assert merge["exact"] is True
        # an exact merge: the merged model scores exactly as the adapter model did
        assert merged["ppl"]["ppl"] == pytest.approx(adapter["ppl"]["ppl"], rel=1e-5)
    manifest = read_manifest(out / "adapter")
    assert manifest["base"]["fingerprint"] and manifest["targets"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    if not quantized:  # the adapter loads onto the original base and only onto it
        from dsq.core.checkpoint import bundled_model_path
        from dsq.core.loading import load_checkpoint

        base = load_checkpoint(bundled_model_path()).model
        model = load_adapter(base, out / "adapter", expected_base=manifest["base"])
        assert {n for n, _ in model.named_parameters() if "lora_" in n}
