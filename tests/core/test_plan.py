"""``dsq plan``: exact parameter and byte counts without loading weights, config-only plans, CLI."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dsq.cli import main
from dsq.core.checkpoint import bundled_model_path
from dsq.run.recipe import load_recipe
from dsq.tools.plan import DEFAULT_CPU_TFLOPS, DEFAULT_GPU_TFLOPS, plan_checkpoint
from dsq.tools.testing import tensor_data_bytes

PUBLIC = Path(__file__).resolve().parents[2] / "dsq" / "assets" / "public_configs"
ARCHITECTURES = ("deepseek_v3", "deepseek_v2", "llama", "qwen2")
GiB = 1 << 30
# Bytes a safetensors file adds to its tensor data: the 8-byte length and the JSON header.
HEADER_OVERHEAD = 0.01



def compressed_bytes(model) -> int:
    from dsq.quantize.compressed_tensors_format import compress_model

    tensors = compress_model(model, "test").tensors
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ----------------------------------------------------------------------------- exact counts


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_parameter_count_equals_the_real_model(tiny_checkpoint, model_type):
    root = tiny_checkpoint(model_type)
    plan = plan_checkpoint(root)
    model = AutoModelForCausalLM.from_pretrained(root)
    assert plan.parameters.total == sum(p.numel() for p in model.parameters())
    assert sum(n for _, n in plan.parameters.by_category) == plan.parameters.total
    assert sum(p.parameters for p in plan.layers) + dict(plan.parameters.by_category)["embeddings"] < plan.parameters.total
    # headers agree with the model: nothing unused, nothing missing
    assert plan.source.header_parameters == plan.parameters.total + plan.parameters.buffers
    assert plan.source.unused is None and plan.source.missing == ()
    moe = [p.moe for p in plan.layers]
    assert moe == ([False, True] if model_type.startswith("deepseek") else [False, False])


def test_tied_embeddings_are_counted_once(tmp_path):
    from dsq.tools.testing import make_tiny_checkpoint

    root = make_tiny_checkpoint("qwen2", tmp_path / "tied", tie_word_embeddings=True)
    plan = plan_checkpoint(root)
    model = AutoModelForCausalLM.from_pretrained(root)
    assert plan.parameters.tied_embeddings and "lm_head" not in dict(plan.parameters.by_category)
    assert plan.parameters.total == sum(p.numel() for p in model.parameters())
    assert plan.source.header_parameters == plan.parameters.total and plan.source.missing == ()
    assert plan.source.tensor_bytes == tensor_data_bytes([root / "model.safetensors"])


@pytest.mark.parametrize("shards", [1, 3])
def test_source_bytes_are_the_files_tensor_bytes(tiny_checkpoint, shards):
    root = tiny_checkpoint("deepseek_v3", shards=shards)
    plan = plan_checkpoint(root)
    files = sorted(root.glob("*.safetensors"))
    assert len(files) == shards and plan.source.weight_files == shards
    assert plan.source.from_headers and plan.source.tensor_bytes == tensor_data_bytes(files)
    assert plan.source.tensor_bytes == 4 * (plan.parameters.total + plan.parameters.buffers)  # fp32


QUANT_CASES = [
    ("deepseek_v3", ["quantize.weights.bits=4", "quantize.weights.group_size=32", "quantize.weights.symmetric=false"]),
    ("deepseek_v3", ["quantize.weights.granularity=channel"]),  # 8-bit, packed because experts are quantized
    ("deepseek_v3", ["quantize.weights.group_size=48", "quantize.weights.symmetric=false", "quantize.targets.lm_head=true"]),
    ("deepseek_v3", ["quantize.weights.bits=4", "quantize.targets.exclude=['mlp\\.experts$']", "dtype=bfloat16"]),
    ("deepseek_v2", ["quantize.weights.bits=4", "quantize.weights.group_size=128", "quantize.weights.symmetric=false"]),
    ("llama", ["quantize.weights.group_size=64", "quantize.weights.symmetric=false"]),  # 8-bit int-quantized
    ("qwen2", ["quantize.weights.bits=4", "quantize.weights.group_size=32", "quantize.targets.exclude=['layers\\.0\\.']"]),
    ("deepseek_v3", ["quantize.method=w8a8", "quantize.w8a8.smoothquant_alpha=null"]),
    ("qwen2", ["quantize.method=w8a8", "quantize.w8a8.smoothquant_alpha=null"]),
]


@pytest.mark.parametrize("model_type, overrides", QUANT_CASES)
def test_recipe_bytes_equal_what_the_writer_produces(tiny_checkpoint, model_type, overrides):
    """The plan's artifact bytes equal the tensors compressed-tensors serialization writes, exactly."""
    from dsq.quantize import quantize_

    from dsq.core.loading import load_checkpoint

    recipe = load_recipe(None, overrides)
    dtype = getattr(torch, recipe.dtype)
    plan = plan_checkpoint(tiny_checkpoint(model_type), recipe)
    row = plan.schemes[-1]
    assert row.label.startswith("recipe") and row.exact
    loaded = load_checkpoint(tiny_checkpoint(model_type), dtype=dtype)
    report = quantize_(loaded.model, recipe.quantize.config(dtype), progress=False)
    assert row.tensor_bytes == compressed_bytes(loaded.model)
    biases = sum(m.bias.numel() for m in loaded.model.modules() if hasattr(m, "weight_q") and m.bias is not None)
    assert row.quantized_parameters == report.quantized_params - biases  # biases stay in floating point


def test_comparison_rows_and_bf16(tiny_checkpoint):
    plan = plan_checkpoint(tiny_checkpoint("deepseek_v3"))
    rows = {s.label: s for s in plan.schemes}
    assert set(rows) >= {"BF16", "INT8 per-channel sym", "INT4 g128 sym", "INT4 g32 sym"}
    # bf16, but transformers keeps the router's score bias (a buffer) in fp32, and from 5.25 on also the
    # router's weight (its _keep_in_fp32_modules_strict): the bytes of the model it loads in bfloat16
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("deepseek_v3"), dtype=torch.bfloat16)
    loaded = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert rows["BF16"].tensor_bytes == loaded >= 2 * plan.parameters.total + 4 * plan.parameters.buffers
    assert rows["BF16"].quantized_parameters == 0
    assert rows["INT4 g128 sym"].tensor_bytes < rows["INT4 g32 sym"].tensor_bytes < rows["INT8 per-channel sym"].tensor_bytes
    assert rows["INT4 g128 sym"].kept_parameters == dict(plan.parameters.by_category)["lm_head"] + sum(
        n for c, n in plan.parameters.by_category if c in ("embeddings", "norms", "router"))


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["{bits: 8, granularity: channel}"])
def test_estimate_matches_a_dsq_run_artifact(tmp_path, capsys, weights):
    """``dsq run`` on the bundled model writes exactly the tensor bytes the plan predicts (int4 g128 and
    int4 g32 asymmetric: ``tests/tools/test_plan_measured.py``)."""
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"output: {out}\nprogress: false\nquantize: {{weights: {weights}}}\n"
        "eval: {perplexity: null, multiple_choice: null, fidelity: {seq_len: 16, max_tokens: 32}, reload_check: false}\n"
    )
    assert main(["run", str(recipe)]) == 0, capsys.readouterr().err
    plan = plan_checkpoint(bundled_model_path(), load_recipe(recipe))
    predicted = plan.schemes[-1].tensor_bytes
    assert predicted == tensor_data_bytes(sorted(out.glob("*.safetensors")))
    measured = json.loads((out / "report.json").read_text())["candidates"][0]["weight_bytes_disk"]
    assert predicted <= measured <= predicted * (1 + HEADER_OVERHEAD)


# ----------------------------------------------------------------------------- config only, FP8, unused tensors


def test_config_only_plan_matches_the_full_checkpoint(tiny_checkpoint, tmp_path):
    root = tiny_checkpoint("deepseek_v3")
    shutil.copy(root / "config.json", tmp_path / "config.json")
    full, config_only = plan_checkpoint(root), plan_checkpoint(tmp_path)
    assert config_only.config_only and not config_only.source.from_headers and config_only.source.weight_files == 0
    assert config_only.parameters == full.parameters
    assert [s.tensor_bytes for s in config_only.schemes] == [s.tensor_bytes for s in full.schemes]
    # fp32 from the config; the config declares a multi-token-prediction layer (num_nextn_predict_layers),
    # which DeepSeek's published checkpoints carry: it is estimated and counted apart
    mtp = config_only.source.unused
    assert mtp is not None and mtp.examples == ("model.layers.2.*",)
    assert config_only.source.tensor_bytes - mtp.bytes == full.source.tensor_bytes
    assert any("config.json alone" in note for note in config_only.notes)
    assert "config.json only" in config_only.to_markdown()


def fp8_checkpoint(src: Path, dst: Path, *, mtp: bool) -> Path:
    """``src`` with every Linear weight inside the layers in FP8 e4m3 + fp32 128x128 scales (DeepSeek-V3's format)."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
    config["num_nextn_predict_layers"] = 1 if mtp else 0
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(src / "model.safetensors"))
    linear = re.compile(r"^model\.layers\.\d+\..*(proj|proj_with_mqa)\.weight$")
    out = {}
    for name, t in tensors.items():
        if linear.match(name):
            out[name] = t.to(torch.float8_e4m3fn)
            out[name + "_scale_inv"] = torch.ones(math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128))
        else:
            out[name] = t
    if mtp:  # DeepSeek-V3's multi-token-prediction layer sits after the last decoder layer
        n, h = config["num_hidden_layers"], config["hidden_size"]
        out[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(h, 2 * h)
        out[f"model.layers.{n}.enorm.weight"] = torch.ones(h)
        out[f"model.layers.{n}.self_attn.o_proj.weight"] = torch.zeros(h, h).to(torch.float8_e4m3fn)
        out[f"model.layers.{n}.self_attn.o_proj.weight_scale_inv"] = torch.ones(math.ceil(h / 128), math.ceil(h / 128))
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_fp8_source_from_headers_equals_the_config_estimate(tiny_checkpoint, tmp_path):
    ckpt = fp8_checkpoint(tiny_checkpoint("deepseek_v3"), tmp_path / "fp8", mtp=False)
    from_headers = plan_checkpoint(ckpt)
    (tmp_path / "cfg").mkdir()
    shutil.copy(ckpt / "config.json", tmp_path / "cfg" / "config.json")
    from_config = plan_checkpoint(tmp_path / "cfg")
    assert from_headers.source.tensor_bytes == tensor_data_bytes([ckpt / "model.safetensors"])
    assert from_config.source.tensor_bytes == from_headers.source.tensor_bytes
    assert "FP8" in from_config.source.storage and "FP8" in from_headers.source.storage
    assert from_headers.source.header_parameters == from_headers.parameters.total + from_headers.parameters.buffers
    assert from_headers.source.unused is None and from_headers.source.missing == ()
    assert from_headers.source.tensor_bytes < 0.5 * plan_checkpoint(tiny_checkpoint("deepseek_v3")).source.tensor_bytes


def test_unused_checkpoint_tensors_are_counted_separately(tiny_checkpoint, tmp_path):
    ckpt = fp8_checkpoint(tiny_checkpoint("deepseek_v3"), tmp_path / "fp8", mtp=True)
    plan = plan_checkpoint(ckpt)
    unused = plan.source.unused
    h = 128
    assert unused is not None and unused.tensors == 4 and unused.examples == ("model.layers.2.*",)
    assert unused.parameters == 2 * h * h + h + h * h  # scales are not parameters
    assert unused.bytes == 4 * 2 * h * h + 4 * h + h * h + 4
    assert plan.source.tensor_bytes == tensor_data_bytes([ckpt / "model.safetensors"])  # unused included
    assert plan.source.header_parameters == plan.parameters.total + plan.parameters.buffers
    text = plan.to_markdown()
    assert "not used by the model" in text and "not quantized" in text


def test_missing_model_tensors_are_reported(tiny_checkpoint, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("llama"), root)
    tensors = load_file(str(root / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    plan = plan_checkpoint(root)
    assert plan.source.missing == ("model.norm.weight",)
    assert "DIFFERS" in plan.to_markdown()


# ----------------------------------------------------------------------------- public configs


@pytest.mark.parametrize("name, low, high", [
    ("deepseek-r1-distill-qwen-1.5b", 1.75e9, 1.80e9),
    ("deepseek-v2-lite", 15.6e9, 15.8e9),
    ("deepseek-v3", 670e9, 672e9),
])
def test_public_configs_plan_to_their_published_sizes(name, low, high):
    plan = plan_checkpoint(PUBLIC / name)
    assert plan.config_only and low <= plan.parameters.total <= high
    rows = {s.label: s.tensor_bytes for s in plan.schemes}
    assert rows["INT4 g128 sym"] < rows["INT8 per-channel sym"] < rows["BF16"]
    assert plan.streaming.total < plan.in_memory.total


def test_deepseek_v3_plan():
    recipe = load_recipe(None, ["dtype=bfloat16", "quantize.method=gptq", "quantize.weights.bits=4"])
    plan = plan_checkpoint(PUBLIC / "deepseek-v3", recipe, tflops=100)
    assert [p.moe for p in plan.layers] == [False] * 3 + [True] * 58
    # the multi-token-prediction layer of the published checkpoint: ~14B, not part of the model
    assert 13e9 <= plan.source.unused.parameters <= 14.5e9
    assert plan.source.unused.examples == ("model.layers.61.*",)
    # FP8 e4m3 + block scales: about one byte per parameter (the published shards hold ~689 GB)
    assert 630 * GiB <= plan.source.tensor_bytes <= 650 * GiB and "FP8" in plan.source.storage
    by_category = dict(plan.parameters.by_category)
    assert by_category["routed experts (fused)"] == 58 * 256 * 3 * 7168 * 2048
    # GPTQ holds one Hessian sum per expert projection input: 256 x (H^2 + I^2) fp64 in a MoE layer
    # (plus the shared expert's and the experts' shared input: < 10 % more), and the largest batched solve's
    # working set: expert_chunk (8) gate_up weights [4096, 7168] with 8 weight and 3 Hessian fp32 copies each
    moe = plan.layers[3]
    hessians = 256 * 8 * (7168 ** 2 + 2048 ** 2)
    solve = 8 * 4 * (8 * 4096 * 7168 + 3 * 7168 ** 2)
    assert hessians + solve <= moe.statistics_bytes <= 1.1 * hessians + solve
    assert plan.accelerator.total > 80 * GiB  # does not fit one 80 GB GPU with the defaults
    # GPTQ keeps every expert's int8 result and their stacked copy: at least 2 bytes per gate_up element;
    # round to nearest rounds one expert at a time (at least an fp32 copy of it) into one int8 tensor
    gate_up, one_expert = 256 * 2 * 2048 * 7168, 2 * 2048 * 7168
    rtn = plan_checkpoint(PUBLIC / "deepseek-v3", load_recipe(None, ["dtype=bfloat16", "quantize.weights.bits=4"]))
    assert 4 * one_expert < rtn.layers[3].temporary_bytes < 2 * gate_up <= moe.temporary_bytes
    assert plan.time.throughputs == (("given", 100.0),)
    assert plan.time.seconds(50) == pytest.approx(2 * plan.time.seconds(100))
    assert dict(plan.time.flops)["Hessians (2 N K^2)"] > 58 * 256 * 2 * 128 * 256 * 7168 ** 2


def test_calibration_free_recipe_has_no_calibration_terms(tiny_checkpoint):
    plan = plan_checkpoint(tiny_checkpoint("deepseek_v3"))
    assert all(p.statistics_bytes == 0 for p in plan.layers)
    assert not any("activations" in what for what, _ in plan.streaming.parts)
    assert plan.time.throughputs == (("GPU default", DEFAULT_GPU_TFLOPS), ("CPU default", DEFAULT_CPU_TFLOPS))


# ----------------------------------------------------------------------------- CLI


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_markdown(capsys, tiny_checkpoint):
    code, out, err = run(capsys, "plan", tiny_checkpoint("qwen2"), "--tflops", "10")
    assert code == 0, err
    assert out.startswith("# Plan:") and "## Parameters" in out and "## Peak memory (estimate)" in out
    assert "at 10 TFLOPS" in out


def test_cli_json_with_recipe_and_overrides(capsys, tiny_checkpoint, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quantize: {method: gptq, weights: {bits: 4, group_size: 64}, calibration: {samples: 4, seq_len: 32}}\n")
    code, out, err = run(capsys, "plan", tiny_checkpoint("deepseek_v3"), recipe, "dtype=bfloat16", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["method"] == "gptq" and "dtype bfloat16" in data["recipe"]
    assert data["parameters"]["total"] == plan_checkpoint(tiny_checkpoint("deepseek_v3")).parameters.total
    assert set(data["time"]["seconds"]) == {"GPU default", "CPU default"} and data["time"]["estimate"] is True
    assert data["streaming"]["total_bytes"] == sum(data["streaming"]["parts"].values())


def test_cli_missing_directory_exits_2(capsys, tmp_path):
    code, out, err = run(capsys, "plan", tmp_path / "nope")
    assert code == 2 and str(tmp_path / "nope") in err and out == ""


def test_cli_missing_config_exits_2_naming_it(capsys, tmp_path):
    code, _, err = run(capsys, "plan", tmp_path)
    assert code == 2 and "config.json" in err and str(tmp_path) in err


def test_cli_invalid_config_exits_2_naming_it(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = run(capsys, "plan", tmp_path)
    assert code == 2 and str(tmp_path / "config.json") in err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, _, err = run(capsys, "plan", tmp_path)
    assert code == 2 and "config.json" in err and "gpt2" in err


def test_cli_bad_recipe_and_tflops_exit_2(capsys, tiny_checkpoint, tmp_path):
    code, _, err = run(capsys, "plan", tiny_checkpoint("llama"), tmp_path / "missing.yaml")
    assert code == 2 and "missing.yaml" in err
    with pytest.raises(SystemExit) as exc:  # a usage error: argparse exits 2
        main(["plan", str(tiny_checkpoint("llama")), "--tflops", "-1"])
    assert exc.value.code == 2 and "--tflops" in capsys.readouterr().err


def test_plan_counts_the_gptq_expert_chunk():
    """The batched solve's working set grows with ``gptq.expert_chunk`` (8 gate_up weights of V3 by default)."""
    def moe_statistics(*overrides: str) -> int:
        recipe = load_recipe(None, ["dtype=bfloat16", "quantize.method=gptq", "quantize.weights.bits=4", *overrides])
        return plan_checkpoint(PUBLIC / "deepseek-v3", recipe, tflops=100).layers[3].statistics_bytes

    one, default, many = moe_statistics("quantize.gptq.expert_chunk=1"), moe_statistics(), moe_statistics("quantize.gptq.expert_chunk=32")
    per_weight = 4 * (8 * 4096 * 7168 + 3 * 7168 ** 2)  # gate_up [4096, 7168]
    assert many - default == 24 * per_weight
    # one weight at a time, the largest solve is o_proj's [7168, 16384], not an expert's
    o_proj = 4 * (8 * 7168 * 16384 + 3 * 16384 ** 2)
    assert default - one == 8 * per_weight - o_proj


def test_plan_per_process_of_a_calibration_shared_by_several():
    """``--processes N``: each process holds its share of the activations and every statistic; the work is split."""
    recipe = load_recipe(None, ["dtype=bfloat16", "quantize.method=gptq", "quantize.weights.bits=4",
                                "quantize.calibration.samples=192", "quantize.calibration.batch_size=8"])
    one = plan_checkpoint(PUBLIC / "deepseek-v3", recipe, tflops=100)
    four = plan_checkpoint(PUBLIC / "deepseek-v3", recipe, tflops=100, processes=4)
    assert four.time.total_flops == pytest.approx(one.time.total_flops / 4)
    assert [p.statistics_bytes for p in four.layers] == [p.statistics_bytes for p in one.layers]
    assert four.streaming.total < one.streaming.total  # a quarter of the calibration activations
    assert any("4 processes (torchrun --nproc_per_node 4)" in n and "48 of 192 calibration sequences" in n for n in four.notes)
    with pytest.raises(ValueError, match="processes"):
        plan_checkpoint(PUBLIC / "deepseek-v3", recipe, processes=0)
