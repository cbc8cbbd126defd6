"""Quantized KV cache: fake-quantization bounds, calibration, the hook (with and without a cache), the artifact
round trip (config, scales, logits), the recipe, the reload check, the report's serving memory and refusals."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dsq.cli import main
from dsq.core.errors import CheckpointError, QuantizationError, RecipeError
from dsq.core.loading import load_checkpoint
from dsq.eval.memory import serving_memory
from dsq.eval.reload import transformers_reload_check
from dsq.quantize import RTNConfig, quantize_
from dsq.quantize.artifact_load import load_artifact
from dsq.quantize.artifact_save import save_quantized_model
from dsq.quantize.kv_cache import (
    Fp8E4M3KV, Int8KV, KVCacheScheme, KVCacheUnsupported, PerHeadKV, PerTensorKV, attach_kv_cache_quantization,
    calibrate_kv_cache_, fake_quantize, kv_cache_quantization_off, kv_cache_scheme_of, kv_scales, kv_scales_of,
)
from dsq.run.pipeline import run
from dsq.run.recipe import load_recipe
from dsq.tools.testing import tiny_config

INT8 = KVCacheScheme(Int8KV(), PerTensorKV())
INT8_HEAD = KVCacheScheme(Int8KV(), PerHeadKV())
FP8 = KVCacheScheme(Fp8E4M3KV(), PerTensorKV())
FP32_ULP = 2.0 ** -23


def _model(model_type: str, seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32).eval().requires_grad_(False)


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 500, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _calibrated(model_type: str, scheme: KVCacheScheme) -> torch.nn.Module:
    model = _model(model_type)
    attach_kv_cache_quantization(model, scheme)
    calibrate_kv_cache_(model, _ids(4, 32, 1), batch_size=2)
    return model


# ----------------------------------------------------------------------------- math


def test_int8_error_is_at_most_half_a_step_within_range():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.013])
    x = (torch.rand(2, 3, 50, 16, generator=g) * 2 - 1) * 127 * scale  # |x| <= 127 * scale
    q = fake_quantize(x, scale, Int8KV())
    # half a step, plus the fp32 rounding of x / scale and of q * scale (a few ulps of 127 * scale)
    assert float((q - x).abs().max()) <= float(scale) / 2 + 4 * 127 * float(scale) * FP32_ULP
    steps = q / scale
    assert torch.allclose(steps, steps.round(), atol=1e-4)  # every value is an integer number of steps
    beyond = fake_quantize(torch.tensor([1e3, -1e3]), scale, Int8KV())
    torch.testing.assert_close(beyond, torch.tensor([127.0, -128.0]) * scale)  # saturates at the int8 range


def test_fp8_is_the_e4m3_cast_with_relative_error_below_one_sixteenth():
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([0.02])
    x = (torch.rand(1, 2, 64, 32, generator=g) * 2 - 1) * 448 * scale
    q = fake_quantize(x, scale, Fp8E4M3KV())
    expected = (x / scale).to(torch.float8_e4m3fn).float() * scale
    torch.testing.assert_close(q, expected, rtol=0, atol=0)
    normal = (x / scale).abs() >= 2.0 ** -6  # e4m3's smallest normal
    rel = ((q - x).abs() / x.abs())[normal]
    assert float(rel.max()) <= 2.0 ** -4 + 1e-6  # 3 mantissa bits: half an ulp is 2**-4 relative


@pytest.mark.parametrize("dtype, divisor", [(Int8KV(), 127.0), (Fp8E4M3KV(), 448.0)])
def test_scales_are_amax_over_the_largest_code(dtype, divisor):
    amax = torch.tensor([2.54, 0.0, 1.0])
    scales = kv_scales("layer.k_scale", amax, dtype)
    torch.testing.assert_close(scales, torch.tensor([2.54, 2.54, 1.0]) / divisor)  # a head of zeros borrows the max


def test_a_scheme_is_made_of_the_typed_classes():
    with pytest.raises(ValueError, match="Int8KV\\(\\) or Fp8E4M3KV\\(\\)"):
        KVCacheScheme("int8", PerTensorKV())
    with pytest.raises(ValueError, match="PerTensorKV\\(\\) or PerHeadKV\\(\\)"):
        KVCacheScheme(Int8KV(), "head")


def test_a_nan_statistic_is_refused_naming_the_tensor():
    with pytest.raises(QuantizationError, match="model.layers.3.self_attn.v_scale"):
        kv_scales("model.layers.3.self_attn.v_scale", torch.tensor([float("nan")]), Int8KV())


# ----------------------------------------------------------------------------- the hook


@pytest.mark.parametrize("model_type, scheme, shape", [
    ("llama", INT8_HEAD, (2, 1, 1)),  # tiny llama: 2 KV heads
    ("qwen2", INT8, (1,)),
    ("deepseek_v3", INT8_HEAD, (1, 1, 1)),  # MLA caches one latent "head"
    ("deepseek_v2", FP8, (1,)),
])
def test_scales_are_persistent_buffers_of_every_attention(model_type, scheme, shape):
    model = _calibrated(model_type, scheme)
    state = model.state_dict()
    for i in range(model.config.num_hidden_layers):
        for name in ("k_scale", "v_scale"):
            scale = state[f"model.layers.{i}.self_attn.{name}"]
            assert tuple(scale.shape) == shape and scale.dtype == torch.float32 and bool((scale > 0).all())
    assert kv_cache_scheme_of(model) == scheme


def test_observing_leaves_the_outputs_unchanged():
    model = _model("llama")
    ids = _ids(2, 16, 2)
    before = model(input_ids=ids).logits
    attach_kv_cache_quantization(model, INT8)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["llama", "deepseek_v3", "deepseek_v32"])
def test_the_forward_without_a_cache_sees_the_quantized_keys_and_values(model_type):
    model = _calibrated(model_type, INT8)
    ids = _ids(2, 24, 3)
    with kv_cache_quantization_off(model):
        fp = model(input_ids=ids, use_cache=False).logits
    no_cache = model(input_ids=ids, use_cache=False).logits
    cached = model(input_ids=ids, use_cache=True).logits
    assert float((no_cache - fp).abs().max()) > 1e-3  # the quantization changes the logits
    # the same tensors go through the same attention: a cached prefill and a forward without a cache agree
    torch.testing.assert_close(no_cache, cached, rtol=0, atol=1e-6)


def test_the_cache_holds_values_on_the_int8_grid_and_decoding_matches_the_prefill():
    model = _calibrated("llama", INT8_HEAD)
    ids = _ids(1, 20, 4)
    full = model(input_ids=ids, use_cache=False).logits
    out = model(input_ids=ids[:, :12], use_cache=True)
    keys = out.past_key_values.layers[0].keys  # (1, kv_heads, 12, head_dim)
    steps = keys / model.model.layers[0].self_attn.k_scale
    assert torch.allclose(steps, steps.round(), atol=1e-3) and float(steps.abs().max()) <= 128
    cache = out.past_key_values
    for t in range(12, 20):  # one token at a time: the decode path quantizes each new entry the same way
        step = model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
        cache = step.past_key_values
        # decode attends with other matmul shapes (fp32 summation order): close, not bit-equal
        torch.testing.assert_close(step.logits[:, -1], full[:, t], rtol=0, atol=1e-4)


def test_deepseek_v4_is_refused_naming_the_architecture():
    model = _model("deepseek_v4")
    with pytest.raises(KVCacheUnsupported, match="deepseek_v4.*DeepseekV4Attention.*cache.update\\(kv, kv\\)"):
        attach_kv_cache_quantization(model, INT8)
    assert kv_cache_scheme_of(model) is None


# ----------------------------------------------------------------------------- the artifact


def _quantized_artifact(checkpoint: Path, out: Path, scheme: KVCacheScheme) -> tuple[torch.nn.Module, Path]:
    loaded = load_checkpoint(checkpoint)
    quantize_(loaded.model, RTNConfig(), progress=False)
    attach_kv_cache_quantization(loaded.model, scheme)
    calibrate_kv_cache_(loaded.model, _ids(4, 32, 5), batch_size=4)
    out.mkdir()
    save_quantized_model(loaded.model, loaded.tokenizer, out)
    return loaded.model, out


@pytest.mark.parametrize("model_type, scheme, strategy, ct_type", [
    ("llama", INT8_HEAD, "attn_head", "int"),
    ("deepseek_v3", FP8, "tensor", "float"),
])
def test_scales_and_logits_round_trip_through_the_artifact(tiny_checkpoint, tmp_path, model_type, scheme, strategy, ct_type):
    model, root = _quantized_artifact(tiny_checkpoint(model_type), tmp_path / "art", scheme)
    kv = json.loads((root / "config.json").read_text())["quantization_config"]["kv_cache_scheme"]
    assert (kv["num_bits"], kv["type"], kv["strategy"], kv["symmetric"], kv["dynamic"]) == (8, ct_type, strategy, True, False)
    stored = load_file(str(root / "model.safetensors"))
    ours = kv_scales_of(model)
    assert set(ours) == {f"model.layers.{i}.self_attn.{s}" for i in range(2) for s in ("k_scale", "v_scale")}
    loaded = load_artifact(root).model
    theirs = kv_scales_of(loaded)
    for name, value in ours.items():
        assert torch.equal(stored[name], value) and torch.equal(theirs[name], value)
    assert kv_cache_scheme_of(loaded) == scheme
    ids = _ids(2, 16, 6)
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(loaded(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits,
                               rtol=0, atol=0)


def test_reload_check_compares_with_the_kv_cache_off_and_checks_the_scales(tiny_checkpoint, tmp_path):
    model, root = _quantized_artifact(tiny_checkpoint("llama"), tmp_path / "art", INT8)
    check = transformers_reload_check(root, model)
    assert check.passed and check.kv_cache is not None
    assert check.kv_cache.applied is False and "switched off" in check.kv_cache.note  # transformers 5.25 does not apply it
    assert check.max_abs_diff <= 1e-4
    tampered = tmp_path / "tampered"
    shutil.copytree(root, tampered)
    tensors = load_file(str(tampered / "model.safetensors"))
    tensors["model.layers.1.self_attn.v_scale"] = tensors["model.layers.1.self_attn.v_scale"] * 2
    save_file(tensors, str(tampered / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QuantizationError, match="model.layers.1.self_attn.v_scale"):
        transformers_reload_check(tampered, model)


@pytest.mark.parametrize("key, value", [
    ("strategy", "channel"), ("type", "int4"), ("num_bits", 4), ("dynamic", True), ("symmetric", False),
])
def test_a_kv_cache_scheme_dsq_does_not_read_is_refused_naming_the_key(tiny_checkpoint, tmp_path, key, value):
    _, root = _quantized_artifact(tiny_checkpoint("llama"), tmp_path / "art", INT8)
    config = json.loads((root / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"][key] = value
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"quantization_config.kv_cache_scheme.{key}"):
        load_artifact(root)


def test_a_non_positive_stored_scale_is_refused(tiny_checkpoint, tmp_path):
    _, root = _quantized_artifact(tiny_checkpoint("llama"), tmp_path / "art", INT8)
    tensors = load_file(str(root / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_scale"] = torch.zeros(1)
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.0.self_attn.k_scale"):
        load_artifact(root)


def test_onnx_keeps_an_fp32_cache_and_says_the_scheme_is_not_carried(tiny_checkpoint, tmp_path):
    from dsq.export import export_onnx
    from dsq.tools.testing import fast_export_config

    model, root = _quantized_artifact(tiny_checkpoint("llama"), tmp_path / "art", INT8)
    loaded = load_artifact(root)
    result = export_onnx(loaded.model, loaded.tokenizer, tmp_path / "onnx", fast_export_config())
    assert result.validation.passed  # against the model with its KV-cache quantization off
    entry = json.loads((tmp_path / "onnx" / "export_manifest.json").read_text())["kv_cache"]
    assert entry["carried"] is False and entry["artifact_kv_cache_scheme"] == "int8 per-tensor KV cache"
    ids = _ids(1, 12, 7)  # the model's own KV-cache quantization is back on after the export
    torch.testing.assert_close(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the recipe and the run


def _eval_overrides() -> list[str]:
    return ["eval.multiple_choice=null", "eval.perplexity.max_tokens=1024", "eval.perplexity.context=128",
            "eval.perplexity.stride=64", "eval.fidelity.seq_len=64", "eval.fidelity.max_tokens=256", "progress=false"]


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    from dsq.tools.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("kv_run")
    checkpoint = make_tiny_checkpoint("llama", root / "llama")
    recipe = load_recipe(None, [f"model={checkpoint}", f"output={root / 'out'}", "kv_cache.dtype=int8",
                                "kv_cache.granularity=head", "kv_cache.samples=4", *_eval_overrides()])
    return run(recipe), root / "out", checkpoint


def test_a_run_calibrates_saves_and_evaluates_the_quantized_cache(llama_run):
    result, out, _ = llama_run
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"]["strategy"] == "attn_head"
    row = json.loads((out / "report.json").read_text())["candidates"][0]
    assert row["name"] == "rtn-int8-g128-kv-int8-head"
    calibration = row["extra"]["quantization"]["calibration"]["kv_cache"]
    assert (calibration["samples"], calibration["attention_modules"]) == (4, 2)
    assert row["extra"]["reload_check"]["passed"] is True
    assert row["extra"]["reload_check"]["kv_cache"]["applied_by_transformers"] is False
    # the run's in-memory model and dsq's reading of the artifact give the same perplexity
    loaded = load_artifact(out)
    assert kv_cache_scheme_of(loaded.model) == INT8_HEAD
    assert result.report.candidates[0].ppl is not None


def test_the_report_carries_kv_bytes_and_serving_memory(llama_run):
    _, out, checkpoint = llama_run
    config = json.loads((checkpoint / "config.json").read_text())
    layers, kv_heads = config["num_hidden_layers"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    report = json.loads((out / "report.json").read_text())
    original, candidate = report["original"]["serving_memory"], report["candidates"][0]["serving_memory"]
    assert original["kv_bytes_per_token"] == layers * kv_heads * 2 * head_dim * 4  # fp32 cache
    assert candidate["kv_bytes_per_token"] == layers * kv_heads * 2 * head_dim * 1  # int8 cache
    for memory, row in ((original, report["original"]), (candidate, report["candidates"][0])):
        assert [c["context"] for c in memory["contexts"]] == [4096, 32768, 131072]
        for c in memory["contexts"]:
            assert c["total_bytes"] == row["weight_bytes_memory"] + c["context"] * memory["kv_bytes_per_token"]
    text = (out / "report.md").read_text()
    assert "## Serving memory (batch 1)" in text and "int8 per-head KV cache" in text and "total @128k GiB" in text


def test_validate_evaluates_the_artifact_with_its_quantized_cache(llama_run, tmp_path):
    from dsq.run.validate import validate

    _, out, _ = llama_run
    result = validate(out, output=tmp_path / "validation", progress=False)
    row = result.report.original  # no baseline: the artifact is the only row
    assert row.serving_memory is not None and row.serving_memory.kv_cache == "int8 per-head KV cache"
    assert "Serving memory" in (tmp_path / "validation" / "report.md").read_text()


@pytest.mark.parametrize("override, key", [
    ("kv_cache.dtype=int4", "kv_cache.dtype"),
    ("kv_cache.granularity=channel", "kv_cache.granularity"),
    ("kv_cache.samples=0", "kv_cache.samples"),
    ("kv_cache.scale=1", "kv_cache.scale"),
])
def test_bad_recipe_values_name_the_key(override, key):
    with pytest.raises(RecipeError, match=key.replace(".", "\\.")):
        load_recipe(None, [override])


@pytest.mark.parametrize("overrides, words", [
    (["quantize.method=bnb-nf4"], "does not write a compressed-tensors artifact"),
    (["streaming=true"], "streaming: true"),
    (["quantize=null", "finetune.lora.r=4"], "needs a 'quantize' section"),
])
def test_recipes_kv_cache_cannot_serve_are_refused(overrides, words):
    with pytest.raises(RecipeError, match=words):
        load_recipe(None, ["kv_cache.dtype=int8", *overrides])


def test_the_cli_refuses_deepseek_v4_before_loading(tiny_checkpoint, tmp_path, capsys):
    code = main(["run", str(Path(__file__).resolve().parents[2] / "recipes" / "int8_channel.yaml"),
                 f"model={tiny_checkpoint('deepseek_v4')}", f"output={tmp_path / 'out'}", "kv_cache.dtype=int8", "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert "kv_cache" in err and "deepseek_v4" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_run_that_would_stream_is_refused_before_loading(tiny_checkpoint, tmp_path, monkeypatch):
    import dsq.run.ranked
    from dsq.run.streaming import StreamingDecision

    decision = StreamingDecision(True, "the model needs more than half of the free memory")
    monkeypatch.setattr(dsq.run.ranked, "decide_streaming", lambda *args: decision)
    recipe = load_recipe(None, [f"model={tiny_checkpoint('llama')}", f"output={tmp_path / 'out'}", "kv_cache.dtype=int8"])
    with pytest.raises(RecipeError, match="kv_cache: .*streams the checkpoint one decoder layer at a time"):
        run(recipe)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- serving memory


def test_serving_memory_counts_the_latent_and_rope_key_of_mla():
    model = _model("deepseek_v3")
    config = model.config
    fp = serving_memory(model, 1000)
    per_token = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim)
    assert fp.kv_bytes_per_token == per_token * 4 and fp.kv_cache == "float32 KV cache"
    attach_kv_cache_quantization(model, FP8)
    q = serving_memory(model, 1000)
    assert q.kv_bytes_per_token == per_token and q.contexts[0].total_bytes == 1000 + 4096 * per_token
    assert serving_memory(_model("deepseek_v4"), 1000) is None  # its caches are not modelled
