"""Streaming quantization: one decoder layer at a time from the shards, identical to the in-memory path."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsq.quantize.artifact_save import save_quantized_model
from dsq.core.loading import load_checkpoint
from dsq.cli import main
from dsq.core.errors import CheckpointError, RecipeError
from dsq.run.pipeline import run
from dsq.quantize import AWQConfig, GPTQConfig, PerChannel, PerGroup, RTNConfig, TargetSpec, WeightScheme, quantize_
from dsq.run.recipe import load_recipe
from dsq.core.shards import ShardWriter
from dsq.quantize.streaming import quantize_streaming
from dsq.run.streaming import decide_streaming
from dsq.core.checkpoint import validate_checkpoint


def _tensors(root: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _calibration(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (4, 32), generator=torch.Generator().manual_seed(0))


def _assert_identical(in_memory: Path, streamed: Path, streamed_config: dict) -> None:
    a, b = _tensors(in_memory), _tensors(streamed)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    assert json.loads((in_memory / "config.json").read_text()) == json.loads(json.dumps(streamed_config))


CASES = [
    ("deepseek_v3", RTNConfig(WeightScheme(4, PerGroup(32))), torch.float32),
    ("deepseek_v3", GPTQConfig(WeightScheme(4, PerGroup(32)), TargetSpec(lm_head=True)), torch.float32),
    ("deepseek_v3", AWQConfig(WeightScheme(4, PerGroup(32), symmetric=False), grid=3), torch.float32),
    ("deepseek_v2", RTNConfig(WeightScheme(8, PerChannel())), torch.bfloat16),
    ("llama", GPTQConfig(WeightScheme(4, PerGroup(32)), act_order=False), torch.float32),
    ("qwen2", AWQConfig(WeightScheme(4, PerGroup(32)), grid=3), torch.bfloat16),
    ("deepseek_v3", RTNConfig(WeightScheme(4, PerGroup(32)), TargetSpec(exclude=(r"layers\.1\.",))), torch.float32),
]


@pytest.mark.parametrize("model_type,config,dtype", CASES, ids=[f"{c[0]}-{type(c[1]).__name__}-{c[2]}" for c in CASES])
def test_streamed_tensors_identical_to_in_memory(tmp_path, tiny_checkpoint, model_type, config, dtype):
    src = tiny_checkpoint(model_type, shards=3)
    calibration = _calibration(512)
    loaded = load_checkpoint(src, dtype=dtype)
    in_memory = quantize_(loaded.model, config, calibration=calibration, progress=False)
    dtype_name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    save_quantized_model(loaded.model, loaded.tokenizer, _mk(tmp_path / "mem"), dtype_name=dtype_name)
    out = _mk(tmp_path / "stream")
    result = quantize_streaming(src, out, config, calibration=calibration, dtype=dtype, progress=False, max_shard_bytes=64 << 10)
    assert len(result.files) > 1 and (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_tensors(out))
    _assert_identical(tmp_path / "mem", out, result.config)
    assert [(r.name, r.quantized, r.params) for r in result.report.modules] == [
        (r.name, r.quantized, r.params) for r in in_memory.modules
    ]
    assert result.report.other_params == in_memory.other_params


def test_shard_writer_limits_and_index(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=1000)
    for i in range(5):  # one part of 400 bytes per add: shards of two, two and one part
        writer.add({f"t{i}": torch.full((100,), float(i)), f"i{i}": torch.arange(i + 1)})
    names = writer.close()
    assert len(names) == 3 and not list(tmp_path.glob(".part-*"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000 + 8 * 15
    assert sorted(index["weight_map"]) == sorted([f"t{i}" for i in range(5)] + [f"i{i}" for i in range(5)])
    tensors = _tensors(tmp_path)  # merged files are valid safetensors (header offsets rebased)
    for i in range(5):
        assert torch.equal(tensors[f"t{i}"], torch.full((100,), float(i))) and torch.equal(tensors[f"i{i}"], torch.arange(i + 1))
        assert index["weight_map"][f"t{i}"] == index["weight_map"][f"i{i}"]


def test_shard_writer_single_shard(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.add({"a": torch.ones(3)})
    writer.add({"b": torch.zeros(2, 2, dtype=torch.bfloat16)})
    assert writer.close() == ["model.safetensors"] and not (tmp_path / "model.safetensors.index.json").exists()
    tensors = _tensors(tmp_path)
    assert torch.equal(tensors["a"], torch.ones(3)) and tensors["b"].dtype == torch.bfloat16


def test_shard_writer_refuses_non_finite(tmp_path):
    writer = ShardWriter(tmp_path)
    with pytest.raises(Exception, match="t_bad"):
        writer.add({"t_bad": torch.tensor([1.0, float("nan")])})


def _recipe(tmp_path: Path, src: Path, **extra) -> Path:
    lines = [
        f"model: {src}", f"output: {tmp_path / 'out'}", "progress: false",
        "quantize: {method: rtn, weights: {bits: 4, group_size: 32}}",
        "eval: {perplexity: {data: %s, context: 32, stride: 16}, multiple_choice: null, fidelity: {seq_len: 32, max_tokens: 256}, "
        "gates: {max_ppl_increase_pct: 50}}" % (tmp_path / "held.txt"),
        *[f"{k}: {v}" for k, v in extra.items()],
    ]
    (tmp_path / "held.txt").write_text("def add(a, b):\n    return a + b\n\n" * 30)
    path = tmp_path / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_streamed_run_evaluates_and_reports(tmp_path, tiny_checkpoint):
    src = tiny_checkpoint("deepseek_v3", shards=2)
    result = run(load_recipe(_recipe(tmp_path, src, streaming="true", max_shard_mb=1)))
    assert result.gates_passed and result.report is not None
    assert result.report.meta["streaming"]["streamed"] is True
    quant = result.report.candidates[0].quantization
    assert quant.peak_rss_bytes > 0 and quant.streaming.weight_files >= 1
    assert any("streamed" in n for n in quant.report.notes)
    assert result.reload is not None and result.reload.passed


def test_auto_streaming_when_memory_is_short(tmp_path, tiny_checkpoint, monkeypatch):
    src = tiny_checkpoint("llama", shards=2)
    files = validate_checkpoint(src)
    monkeypatch.setattr("dsq.run.streaming.available_memory_bytes", lambda: 1000)
    decision = decide_streaming(None, files, torch.float32)
    assert decision.stream and "available" in decision.reason
    assert not decide_streaming(False, files, torch.float32).stream
    code = main(["run", str(_recipe(tmp_path, src))])
    assert code == 1  # the gate could not be evaluated here: it fails, named
    report = (tmp_path / "out" / "report.md").read_text()
    assert "not evaluated" in report and "max_ppl_increase_pct" in report
    assert (tmp_path / "out" / "manifest.json").exists() and (tmp_path / "out" / "model.safetensors").exists()


def test_streaming_refuses_w8a8(tmp_path, tiny_checkpoint):
    src = tiny_checkpoint("llama")
    recipe = _recipe(tmp_path, src, streaming="true")
    text = recipe.read_text().replace("{method: rtn, weights: {bits: 4, group_size: 32}}", "{method: w8a8}")
    recipe.write_text(text)
    with pytest.raises(RecipeError, match="streaming supports"):
        run(load_recipe(recipe))
    assert not (tmp_path / "out").exists()


def _rewrite_shard(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    for f in sorted(dst.glob("*.safetensors")):
        tensors = load_file(f)
        if edit(tensors):
            save_file(tensors, str(f), metadata={"format": "pt"})
    return dst


def test_missing_layer_tensor_names_it_and_writes_nothing(tmp_path, tiny_checkpoint, capsys):
    name = "model.layers.1.self_attn.o_proj.weight"
    src = _rewrite_shard(tiny_checkpoint("llama", shards=1), tmp_path / "broken",
                         lambda t: t.pop(name, None) is not None)
    out = tmp_path / "never"
    with pytest.raises(CheckpointError, match=r"o_proj\.weight"):
        quantize_streaming(src, _mk(out), RTNConfig(), progress=False)
    code = main(["run", str(_recipe(tmp_path, src, streaming="true"))])
    assert code == 2 and "o_proj.weight" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_wrong_shape_names_tensor(tmp_path, tiny_checkpoint):
    name = "model.layers.0.mlp.down_proj.weight"

    def edit(t):
        if name in t:
            t[name] = t[name][:, :-1].contiguous()
            return True
        return False

    src = _rewrite_shard(tiny_checkpoint("qwen2", shards=1), tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=r"down_proj\.weight.*shape"):
        quantize_streaming(src, _mk(tmp_path / "o"), RTNConfig(), progress=False)


def test_unused_checkpoint_tensors_are_reported(tmp_path, tiny_checkpoint):
    def edit(t):
        t["model.layers.99.extra.weight"] = torch.zeros(4, 4)
        return True

    src = _rewrite_shard(tiny_checkpoint("llama", shards=1), tmp_path / "extra", edit)
    result = quantize_streaming(src, _mk(tmp_path / "o"), RTNConfig(), progress=False)
    assert result.unused_tensors == ["model.layers.99.extra.weight"]
    assert any("not used" in n and "layers.99" in n for n in result.report.notes)


def _mk(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


# ----------------------------------------------------------------------------- FP8 bases


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    """A tiny DeepSeek-V3-shaped checkpoint stored FP8 block-scaled (as DeepSeek-V3/R1 ship), and its BF16 twin."""
    from dsq.tools.synthetic import deepseek_v3_config, write_synthetic_checkpoint

    config = deepseek_v3_config(
        hidden_size=320, num_layers=3, num_experts=4, moe_intermediate_size=192, intermediate_size=448,
        q_lora_rank=192, kv_lora_rank=96, heads=2, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        num_experts_per_tok=2,
    )
    root = tmp_path_factory.mktemp("fp8")
    fp8 = write_synthetic_checkpoint(root / "fp8", config, fp8=True, max_shard_bytes=1 << 20, seed=3)
    bf16 = write_synthetic_checkpoint(root / "bf16", config, fp8=False, max_shard_bytes=1 << 20, seed=3)
    return fp8, bf16


def _disk_tensor(root: Path, name: str) -> torch.Tensor:
    index = json.loads((root / "model.safetensors.index.json").read_text())
    return load_file(root / index["weight_map"][name])[name]


def test_fp8_checkpoint_loads_dequantized_block_by_block(fp8_pair):
    fp8, bf16 = fp8_pair
    model = load_checkpoint(fp8, dtype=torch.float32).model
    reference = load_checkpoint(bf16, dtype=torch.float32).model
    # independent reference: every 128 x 128 block times its scale, by explicit loops
    for name, param in (("model.layers.1.self_attn.kv_a_proj_with_mqa.weight", model.model.layers[1].self_attn.kv_a_proj_with_mqa.weight),
                        ("model.layers.2.mlp.experts.3.down_proj.weight", model.model.layers[2].mlp.experts.down_proj[3])):
        w, s = _disk_tensor(fp8, name).float(), _disk_tensor(fp8, name + "_scale_inv")
        assert w.dtype == torch.float32 and _disk_tensor(fp8, name).dtype == torch.float8_e4m3fn
        expected = torch.empty_like(w)
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                expected[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] * s[i, j]
        assert torch.equal(param.detach(), expected), name
    gate_up = model.model.layers[2].mlp.experts.gate_up_proj[1]  # (2I, H): gate rows above up rows
    up = _disk_tensor(fp8, "model.layers.2.mlp.experts.1.up_proj.weight")
    assert gate_up.shape[0] == 2 * up.shape[0]
    # the FP8 twin is the block quantization of the BF16 weights: close, not equal
    for (n, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        rel = float((a.detach() - b.detach()).norm() / b.detach().norm())
        assert rel < 0.08, (n, rel)


def test_fp8_streamed_equals_in_memory(tmp_path, fp8_pair):
    fp8, _ = fp8_pair
    config = GPTQConfig(WeightScheme(4, PerGroup(64)), act_order=False)
    calibration = _calibration(2048)
    loaded = load_checkpoint(fp8, dtype=torch.bfloat16)
    quantize_(loaded.model, config, calibration=calibration, progress=False)
    save_quantized_model(loaded.model, loaded.tokenizer, _mk(tmp_path / "mem"), dtype_name="bfloat16")
    result = quantize_streaming(fp8, _mk(tmp_path / "stream"), config, calibration=calibration, dtype=torch.bfloat16, progress=False)
    _assert_identical(tmp_path / "mem", tmp_path / "stream", result.config)
    assert "quantization_config" in result.config and result.config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert not any(k.endswith("_scale_inv") for k in _tensors(tmp_path / "stream"))
    assert result.unused_tensors == []


def test_fp8_weight_without_scale_is_refused(tmp_path, fp8_pair):
    fp8, _ = fp8_pair
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    broken = _rewrite_shard(fp8, tmp_path / "noscale", lambda t: t.pop(name, None) is not None)
    with pytest.raises(CheckpointError, match=r"o_proj\.weight"):
        quantize_streaming(broken, _mk(tmp_path / "o"), RTNConfig(), progress=False)


# ----------------------------------------------------------------------------- one layer on the accelerator


def test_on_device_lifecycle_gives_the_same_artifact(tmp_path, tiny_checkpoint):
    from dsq.quantize.sequential import RESIDENT, OnDevice

    src = tiny_checkpoint("deepseek_v3")
    config = GPTQConfig(WeightScheme(4, PerGroup(32)))
    calibration = _calibration(512)
    for name, lifecycle in (("plain", RESIDENT), ("on", OnDevice(RESIDENT, "cpu"))):
        loaded = load_checkpoint(src)
        quantize_(loaded.model, config, calibration=calibration, progress=False, lifecycle=lifecycle)
        save_quantized_model(loaded.model, loaded.tokenizer, _mk(tmp_path / name))
    a, b = _tensors(tmp_path / "plain"), _tensors(tmp_path / "on")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_quantize_device_is_checked(tmp_path, tiny_checkpoint, capsys):
    src = tiny_checkpoint("llama")
    recipe = _recipe(tmp_path, src)
    if not torch.cuda.is_available():
        assert main(["run", str(recipe), "quantize.device=cuda"]) == 2
        assert "quantize.device" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["run", str(recipe), "quantize.device=not-a-device"]) == 2
    assert "quantize.device" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_gptq_on_cuda_matches_cpu(tmp_path, tiny_checkpoint):
    src = tiny_checkpoint("deepseek_v3", shards=2)
    config = GPTQConfig(WeightScheme(4, PerGroup(32)), act_order=False)
    calibration = _calibration(512)
    cpu = quantize_streaming(src, _mk(tmp_path / "cpu"), config, calibration=calibration, progress=False)
    gpu = quantize_streaming(src, _mk(tmp_path / "gpu"), config, calibration=calibration, progress=False, device="cuda")
    a, b = _tensors(tmp_path / "cpu"), _tensors(tmp_path / "gpu")
    assert set(a) == set(b)
    scales = [k for k in a if k.endswith("weight_scale")]
    assert scales and all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-2, atol=1e-6) for k in scales)
    assert cpu.report.quantized_params == gpu.report.quantized_params


def test_slice_by_slice_rtn_and_packing_equal_the_whole_tensor():
    from dsq.quantize.primitives import pack_int4, quantize_rtn, quantize_rtn_slices

    w = torch.randn(5, 64, 96, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for scheme in (WeightScheme(4, PerGroup(32)), WeightScheme(4, PerGroup(40), symmetric=False), WeightScheme(8, PerChannel())):
        a, b = quantize_rtn(w, scheme), quantize_rtn_slices(w, scheme)
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scale, b.scale)
        assert (a.zero is None and b.zero is None) or torch.equal(a.zero, b.zero)
    q = torch.randint(-8, 8, (3, 5, 7), dtype=torch.int8)
    assert torch.equal(pack_int4(q), torch.stack([pack_int4(x) for x in q]))
