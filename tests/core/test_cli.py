"""The CLI end to end on tiny checkpoints: exit codes, messages, and no artifact on failure."""
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from dsq.core.manifest import sha256_file
from dsq.cli import main

HELD_OUT = "def add(a, b):\n    return a + b\n\n" * 40


@pytest.fixture()
def data(tmp_path):
    text = tmp_path / "held.txt"
    text.write_text(HELD_OUT)
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(
        json.dumps({"context": "def add(a, b):\n", "choices": ["    return a + b\n", " zzz"], "gold": 0}) + "\n"
        for _ in range(3)
    ))
    return text, mc


def recipe(tmp_path, model, data, extra="", gates=""):
    text, mc = data
    p = tmp_path / "recipe.yaml"
    p.write_text(
        f"model: {model}\noutput: {tmp_path / 'out'}\nprogress: false\n{extra}"
        "quantize: {weights: {bits: 4, group_size: 64}}\n"
        f"eval:\n  perplexity: {{data: {text}, context: 64, stride: 32}}\n"
        f"  multiple_choice: {{data: {mc}}}\n  fidelity: {{seq_len: 32, max_tokens: 128}}\n"
        f"  gates: {{{gates}}}\n"
    )
    return p


def no_artifact(tmp_path):
    left = [p.name for p in tmp_path.iterdir() if p.name == "out" or ".partial-" in p.name]
    return not left


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_run_writes_verified_artifact(tmp_path, tiny_deepseek_v3, data, capsys):
    code, out, err = run(capsys, "run", recipe(tmp_path, tiny_deepseek_v3, data, gates="max_ppl_increase_pct: 50"))
    assert code == 0, err
    art = tmp_path / "out"
    assert "rtn-int4-g64" in out and "original" in out and "PASS" in out
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["source"]["model_type"] == "deepseek_v3"
    for name, digest in manifest["files"].items():
        assert sha256_file(art / name) == digest
    assert {"config.json", "model.safetensors", "recipe.yaml", "report.json", "report.md"} <= set(manifest["files"])
    config = json.loads((art / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["format"] == "pack-quantized"
    keys = load_file(art / "model.safetensors").keys()
    assert "model.layers.1.mlp.experts.7.down_proj.weight_packed" in keys  # one tensor set per expert
    report = json.loads((art / "report.json").read_text())
    cand = report["candidates"][0]
    assert cand["extra"]["reload_check"]["passed"] is True
    assert cand["extra"]["quantization"]["quantized_bytes_ratio_vs_fp16"] < 0.30


def test_gate_failure_exits_1_naming_metric(tmp_path, tiny_deepseek_v3, data, capsys):
    code, out, err = run(capsys, "run", recipe(tmp_path, tiny_deepseek_v3, data, gates="max_mean_kl: 0.0"))
    assert code == 1
    assert "max_mean_kl" in err and "mean_kl" in err
    assert (tmp_path / "out" / "manifest.json").exists()  # the artifact itself is valid


def _broken(tmp_path, src, how):
    dst = tmp_path / "model"
    if how == "missing directory":
        return dst
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    if how == "no config.json":
        (dst / "config.json").unlink()
    elif how == "unsupported model type":
        cfg = json.loads((dst / "config.json").read_text())
        cfg["model_type"] = "gpt2"
        (dst / "config.json").write_text(json.dumps(cfg))
    elif how == "pickle-only weights":
        weights.unlink()
        (dst / "pytorch_model.bin").write_bytes(b"not a pickle")
    elif how == "truncated safetensors":
        data = weights.read_bytes()
        weights.write_bytes(data[:-100])
    elif how == "corrupt safetensors":
        weights.write_bytes(b"\xff" * 64)
    elif how == "missing tensor":
        tensors = load_file(weights)
        tensors.pop("model.layers.0.self_attn.o_proj.weight")
        save_file(tensors, weights, metadata={"format": "pt"})
    return dst


BAD_CHECKPOINTS = {
    "missing directory": "does not exist",
    "no config.json": "config.json",
    "unsupported model type": "deepseek_v3",  # the message lists the supported types
    "pickle-only weights": "pickle",
    "truncated safetensors": "model.safetensors",
    "corrupt safetensors": "model.safetensors",
    "missing tensor": "model.layers.0.self_attn.o_proj.weight",
}


@pytest.mark.parametrize("how", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_exits_2_and_leaves_nothing(tmp_path, tiny_deepseek_v3, data, capsys, how):
    model = _broken(tmp_path, tiny_deepseek_v3, how)
    code, out, err = run(capsys, "run", recipe(tmp_path, model, data))
    assert code == 2
    assert BAD_CHECKPOINTS[how] in err
    assert no_artifact(tmp_path)


BAD_RECIPES = {
    "unknown key": ("", ["quantize.weights.bitz=4"], "quantize.weights.bitz"),
    "mistyped value": ("", ["quantize.weights.group_size=many"], "quantize.weights.group_size"),
    "bad override syntax": ("", ["bits"], "key.path=value"),
    "bad pattern": ("", ["quantize.targets.exclude=['(']"], "invalid module pattern"),
    "missing data file": ("", ["eval.perplexity.data=/nonexistent/held.txt"], "/nonexistent/held.txt"),
    "existing output without overwrite": ("", [], "already exists"),
    "learned rounding without steps": ("", ["quantize.method=autoround", "quantize.autoround.steps=0"],
                                       "quantize.autoround.steps"),
    "negative activation budget": ("", ["quantize.method=autoround", "quantize.autoround.cache_budget_mb=-1"],
                                   "quantize.autoround.cache_budget_mb"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_exits_2_and_leaves_nothing(tmp_path, tiny_deepseek_v3, data, capsys, case):
    extra, overrides, expected = BAD_RECIPES[case]
    r = recipe(tmp_path, tiny_deepseek_v3, data, extra)
    if case == "existing output without overwrite":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "precious.txt").write_text("keep me")
    code, out, err = run(capsys, "run", r, *overrides)
    assert code == 2
    assert expected in err
    if case == "existing output without overwrite":
        assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"
    else:
        assert no_artifact(tmp_path)


def test_help_and_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "run" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert "key.path=value" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_recipe_command_prints_resolved(capsys):
    code, out, _ = run(capsys, "recipe", "recipes/demo.yaml", "quantize.weights.bits=8")
    assert code == 0 and "bits: 8" in out and "group_size: 128" in out


# ----------------------------------------------------------------------------- calibrated methods


def test_gptq_run_on_tiny_llama_writes_reloadable_artifact(tmp_path, tiny_checkpoint, data, capsys):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": HELD_OUT}) + "\n" for _ in range(4)))
    p = recipe(tmp_path, tiny_checkpoint("llama"), data)
    code, out, err = run(
        capsys, "run", p, "quantize.method=gptq", f"quantize.calibration.data={calib}",
        "quantize.calibration.samples=4", "quantize.calibration.seq_len=64", "-q",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    q = report["candidates"][0]["extra"]["quantization"]
    assert q["method"] == "gptq" and q["calibration"]["data"]["source"] == str(calib)
    assert report["candidates"][0]["extra"]["reload_check"]["passed"] is True
    assert "method: gptq" in (tmp_path / "out" / "recipe.yaml").read_text()


@pytest.mark.parametrize("problem, message", [
    ("quantize.calibration.data=/nonexistent/calib.jsonl", "calib.jsonl"),
    ("quantize.calibration.samples=100000", "too short"),
])
def test_bad_calibration_data_exits_2_without_artifact(tmp_path, tiny_checkpoint, data, capsys, problem, message):
    p = recipe(tmp_path, tiny_checkpoint("llama"), data)
    code, out, err = run(capsys, "run", p, "quantize.method=awq", problem, "-q")
    assert code == 2
    assert message in err
    assert no_artifact(tmp_path)


def test_section_for_another_method_is_an_error(tmp_path, tiny_checkpoint, data, capsys):
    p = recipe(tmp_path, tiny_checkpoint("llama"), data)
    code, out, err = run(capsys, "run", p, "quantize.method=awq", "quantize.gptq.damp=0.1", "-q")
    assert code == 2
    assert "'quantize.gptq'" in err and "awq" in err
    assert no_artifact(tmp_path)
