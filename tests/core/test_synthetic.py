"""Synthetic checkpoints: tensor names against real checkpoints, shards and index, loading, FP8 twin."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsq.core.checkpoint import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    bundled_model_path,
    inspect_checkpoint,
    read_safetensors_header,
)
from dsq.core.fp8 import FP8BlockFormat, dequantize_fp8_blocks, fp8_format, fp8_quantization_config, scale_name
from dsq.tools.synthetic import deepseek_v3_config, generate_tensor, write_synthetic_checkpoint
from dsq.core.layout import FP8_KINDS, num_parameters, tensor_specs
from dsq.tools.testing import make_tiny_checkpoint

MAX_SHARD = 256 * 1024
SEED = 7
# Dimensions that are not multiples of 128, so FP8 blocks are ragged (e.g. kv_a_proj_with_mqa: 96 x 192).
SMALL = dict(
    hidden_size=192,
    num_layers=3,
    num_experts=4,
    moe_intermediate_size=80,
    intermediate_size=320,
    q_lora_rank=96,
    kv_lora_rank=64,
    heads=2,
    qk_nope_head_dim=32,
    qk_rope_head_dim=32,
    v_head_dim=48,
    num_experts_per_tok=2,
)
# The Linear weights the official DeepSeek-V3 checkpoints store in FP8.
FP8_NAME = re.compile(
    r"^model\.layers\.\d+\."
    r"(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(gate_proj|up_proj|down_proj)"
    r"|mlp\.shared_experts\.(gate_proj|up_proj|down_proj)"
    r"|mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj))\.weight$"
)


def header_shapes(root: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in sorted(root.glob("*.safetensors")):
        header, _ = read_safetensors_header(file)
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def read_all(root: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(root.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys()})
    return tensors


@pytest.fixture(scope="module")
def small_config() -> dict:
    return deepseek_v3_config(**SMALL)


@pytest.fixture(scope="module")
def written(tmp_path_factory, small_config) -> dict[str, Path]:
    """The same seed written in bf16 and in fp8, sharded at 256 KiB."""
    base = tmp_path_factory.mktemp("synthetic")
    return {
        "bf16": write_synthetic_checkpoint(base / "bf16", small_config, max_shard_bytes=MAX_SHARD, seed=SEED),
        "fp8": write_synthetic_checkpoint(base / "fp8", small_config, fp8=True, max_shard_bytes=MAX_SHARD, seed=SEED),
    }


# --------------------------------------------------------------------------- tensor specs


def test_specs_of_the_bundled_model_match_its_safetensors():
    root = bundled_model_path()
    specs = tensor_specs(json.loads((root / "config.json").read_text()))
    assert {s.name: s.shape for s in specs} == header_shapes(root)
    assert len({s.name for s in specs}) == len(specs)
    kinds = {s.name: s.kind for s in specs}
    assert kinds["model.layers.1.mlp.experts.7.down_proj.weight"] == "expert"
    assert kinds["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"] == "linear"
    assert kinds["model.layers.1.mlp.shared_experts.up_proj.weight"] == "linear"
    assert kinds["model.layers.1.mlp.gate.weight"] == "router"
    assert kinds["model.layers.1.mlp.gate.e_score_correction_bias"] == "router_bias"
    assert kinds["model.layers.0.self_attn.q_a_layernorm.weight"] == "norm"
    assert kinds["model.embed_tokens.weight"] == "embedding" and kinds["lm_head.weight"] == "lm_head"


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [("deepseek_v2", {}), ("llama", {}), ("qwen2", {}), ("llama", {"tie_word_embeddings": True})],
)
def test_specs_match_what_transformers_saves(tmp_path, model_type, overrides):
    root = make_tiny_checkpoint(model_type, tmp_path, vocab_size=320, **overrides)
    specs = tensor_specs(json.loads((root / "config.json").read_text()))
    assert {s.name: s.shape for s in specs} == header_shapes(root)


def test_full_size_config_has_deepseek_v3_parameter_count():
    config = deepseek_v3_config(
        hidden_size=7168, num_layers=61, num_experts=256, moe_intermediate_size=2048,
        first_k_dense_replace=3, heads=128, vocab_size=129280, n_group=8, topk_group=4,
    )
    assert (config["intermediate_size"], config["q_lora_rank"], config["kv_lora_rank"]) == (18432, 1536, 512)
    # DeepSeek-V3: 671B parameters in the main model (the multi-token-prediction module is not written).
    assert abs(num_parameters(tensor_specs(config)) - 671e9) < 0.5e9


def test_config_validation():
    with pytest.raises(ValueError, match="num_layers=0"):
        deepseek_v3_config(**{**SMALL, "num_layers": 0})
    with pytest.raises(ValueError, match="inconsistent routing"):
        deepseek_v3_config(**{**SMALL, "num_experts_per_tok": 5})
    assert deepseek_v3_config(**{**SMALL, "q_lora_rank": 0})["q_lora_rank"] is None
    with pytest.raises(ValueError, match="model_type"):
        tensor_specs({"model_type": "gpt2"})


# --------------------------------------------------------------------------- written checkpoints


@pytest.mark.parametrize("variant", ["bf16", "fp8"])
def test_shards_and_index_are_consistent(written, small_config, variant):
    root = written[variant]
    index = json.loads((root / SAFE_WEIGHTS_INDEX_NAME).read_text())
    weight_map = index["weight_map"]
    shards = sorted(root.glob("*.safetensors"))
    assert len(shards) >= 3 and {p.name for p in shards} == set(weight_map.values())
    seen: list[str] = []
    total = 0
    for shard in shards:
        header, _ = read_safetensors_header(shard)
        names = [k for k in header if k != "__metadata__"]
        seen += names
        assert {k for k, v in weight_map.items() if v == shard.name} == set(names)
        total += sum(header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in names)
        # A shard file exceeds the limit only when it holds one tensor (with its FP8 scale).
        if len({k.removesuffix("_scale_inv") for k in names}) > 1:
            assert shard.stat().st_size <= MAX_SHARD, shard.name
    assert len(seen) == len(set(seen)) == len(weight_map)  # every tensor in exactly one shard
    assert index["metadata"]["total_size"] == total
    specs = tensor_specs(small_config)
    expected = {s.name for s in specs}
    if variant == "fp8":
        expected |= {scale_name(s.name) for s in specs if s.kind in FP8_KINDS}
    assert set(weight_map) == expected
    inspect_checkpoint(root)  # dsq's own validation of headers, index and expert completeness


def test_fp8_layout_matches_the_official_checkpoints(written):
    root = written["fp8"]
    config = json.loads((root / "config.json").read_text())
    assert config["quantization_config"] == fp8_quantization_config(FP8BlockFormat())
    assert fp8_format(config) == FP8BlockFormat((128, 128))
    assert "quantization_config" not in json.loads((written["bf16"] / "config.json").read_text())
    headers = {}
    for shard in root.glob("*.safetensors"):
        header, _ = read_safetensors_header(shard)
        headers.update({k: v for k, v in header.items() if k != "__metadata__"})
    weights = [k for k in headers if not k.endswith("_scale_inv")]
    fp8 = {k for k in weights if headers[k]["dtype"] == "F8_E4M3"}
    assert fp8 == {k for k in weights if FP8_NAME.match(k)}
    assert any(".mlp.experts.3.down_proj." in k for k in fp8) and any("kv_a_proj_with_mqa" in k for k in fp8)
    for name in fp8:
        scale = headers[scale_name(name)]
        assert scale["dtype"] == "F32"
        assert tuple(scale["shape"]) == FP8BlockFormat().scale_shape(tuple(headers[name]["shape"]))
    for name in set(weights) - fp8:
        wanted = "F32" if name.endswith("e_score_correction_bias") else "BF16"
        assert headers[name]["dtype"] == wanted, name


def test_transformers_loads_the_bf16_checkpoint(written):
    from transformers import AutoModelForCausalLM

    root = written["bf16"]
    model, info = AutoModelForCausalLM.from_pretrained(
        str(root), local_files_only=True, use_safetensors=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    files = read_all(root)
    experts = model.model.layers[2].mlp.experts
    inter = SMALL["moe_intermediate_size"]
    assert torch.equal(experts.gate_up_proj[3, :inter], files["model.layers.2.mlp.experts.3.gate_proj.weight"])
    assert torch.equal(experts.gate_up_proj[3, inter:], files["model.layers.2.mlp.experts.3.up_proj.weight"])
    assert torch.equal(experts.down_proj[1], files["model.layers.2.mlp.experts.1.down_proj.weight"])
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert bool(torch.isfinite(logits).all())


def test_fp8_twin_is_the_block_quantization_of_the_bf16_weights(written):
    bf16, fp8 = read_all(written["bf16"]), read_all(written["fp8"])
    fmt = FP8BlockFormat()
    quantized = 0
    for name, value in fp8.items():
        if name.endswith("_scale_inv"):
            continue
        if value.dtype != torch.float8_e4m3fn:
            assert torch.equal(value, bf16[name]), name  # everything else is identical
            continue
        quantized += 1
        scale = fp8[scale_name(name)]
        got = dequantize_fp8_blocks(name, value, scale, fmt, dtype=torch.float32)
        w = bf16[name].float()
        s = scale.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        # e4m3 round to nearest: |deq - w| <= 2^-4 |w| + 2^-10 s per element (see test_fp8).
        assert bool(((got - w).abs() <= (2.0**-4 * w.abs() + 2.0**-10 * s) * (1 + 1e-5)).all()), name
        # Block amax / 448 exactly as DeepSeek defines the scale.
        assert torch.allclose(scale.amax(), w.abs().amax() / 448)
    assert quantized == sum(1 for name in bf16 if FP8_NAME.match(name))


def test_values_depend_only_on_seed_and_name(tmp_path, written, small_config):
    single = write_synthetic_checkpoint(tmp_path / "one", small_config, seed=SEED)
    assert (single / SAFE_WEIGHTS_NAME).is_file() and not (single / SAFE_WEIGHTS_INDEX_NAME).exists()
    one, sharded = read_all(single), read_all(written["bf16"])
    assert one.keys() == sharded.keys() and all(torch.equal(one[k], sharded[k]) for k in one)
    spec = next(s for s in tensor_specs(small_config) if s.kind == "expert")
    other = generate_tensor(spec, seed=SEED + 1)
    assert not torch.equal(other, one[spec.name])
    assert abs(float(one[spec.name].float().std()) - 0.02) < 0.002
    norms = [v for k, v in one.items() if k.endswith("layernorm.weight")]
    assert all(abs(float(v.float().mean()) - 1) < 0.01 for v in norms)
    assert all(not v.any() for k, v in one.items() if k.endswith("e_score_correction_bias"))


def test_written_directory_has_config_and_tokenizer(written, small_config):
    from transformers import AutoTokenizer

    root = written["bf16"]
    config = json.loads((root / "config.json").read_text())
    assert config == {**small_config, "dtype": "bfloat16"}
    assert len(AutoTokenizer.from_pretrained(str(root), local_files_only=True)) <= config["vocab_size"]


def test_refuses_non_empty_directory_and_small_vocab(tmp_path, small_config):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("")
    with pytest.raises(FileExistsError):
        write_synthetic_checkpoint(tmp_path / "x", small_config)
    with pytest.raises(ValueError, match="vocab_size 1000"):
        write_synthetic_checkpoint(tmp_path / "y", {**small_config, "vocab_size": 1000})
