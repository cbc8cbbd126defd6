"""``dsq plan`` on DeepSeek-V4-Flash, DeepSeek-V4-Pro and DeepSeek-V3.2: the bundled official configs, the
FP8 + FP4 source format, hyper-connection activations, compressed attention, and V4 checkpoints with weights."""
from __future__ import annotations

import json
import math
import re
from functools import cache
from pathlib import Path

import pytest
import torch

from dsq.cli import main
from dsq.run.recipe import load_recipe
from dsq.tools.plan import Plan, plan_checkpoint
from dsq.tools.testing import (
    make_rtn_artifact,
    make_tiny_checkpoint,
    tensor_data_bytes,
    tiny_config,
)

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = ROOT / "dsq" / "assets" / "public_configs"
RECIPES = ROOT / "recipes"
GiB = 1 << 30

# Published figures: the model cards' total and activated parameters, and the tensor bytes of the published
# shards (DeepSeek-V4-Flash: model.safetensors.index.json total_size; V4-Pro and V3.2: the sum of the headers).
PUBLISHED = {
    "deepseek-v4-flash": {"total": 284e9, "active": 13e9, "bytes": 159_609_485_896},
    "deepseek-v4-pro": {"total": 1.6e12, "active": 49e9, "bytes": 805.32 * GiB},
    "deepseek-v3.2": {"total": 671e9, "active": 37e9, "bytes": 642.12 * GiB},
}
METHODS = ("gptq_int4_g128", "awq_int4_g128", "autoround_int4_g32", "int4_g32")  # GPTQ, AWQ, autoround, RTN


@cache
def planned(name: str, recipe: str | None = "gptq_int4_g128") -> Plan:
    overrides = ["dtype=bfloat16"]
    loaded = load_recipe(RECIPES / f"{recipe}.yaml", overrides) if recipe else load_recipe(None, overrides)
    return plan_checkpoint(PUBLIC / name, loaded)


def config(name: str) -> dict:
    return json.loads((PUBLIC / name / "config.json").read_text())


def activated(plan: Plan, cfg: dict) -> float:
    """Parameters one token uses: all but the routed experts and the input embedding, plus top-k of E experts."""
    by = dict(plan.parameters.by_category)
    experts = by["routed experts (fused)"]
    return plan.parameters.total - experts - by["embeddings"] + experts * cfg["num_experts_per_tok"] / cfg["n_routed_experts"]


# ----------------------------------------------------------------------------- bundled configs


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_bundled_config_has_the_published_parameter_count(name):
    plan = planned(name, None)
    published = PUBLISHED[name]
    assert plan.config_only and plan.model_type == config(name)["model_type"]
    assert abs(plan.parameters.total / published["total"] - 1) < 0.02
    assert abs(activated(plan, config(name)) / published["active"] - 1) < 0.03
    # the multi-token-prediction block of the published checkpoint is counted apart, not quantized
    assert 0.01 < plan.source.unused.parameters / plan.parameters.total < 0.03


def test_v4_pro_published_total_counts_its_mtp_block():
    plan = planned("deepseek-v4-pro", None)
    assert plan.source.unused.examples == ("mtp.0.*",)
    assert abs((plan.parameters.total + plan.source.unused.parameters) / 1.6e12 - 1) < 0.005


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_source_bytes_from_the_config_match_the_published_shards(name):
    source = planned(name, None).source
    assert not source.from_headers and "FP8 e4m3" in source.storage
    assert abs(source.tensor_bytes / PUBLISHED[name]["bytes"] - 1) < 0.001


@pytest.mark.parametrize("name", ["deepseek-v4-flash", "deepseek-v4-pro"])
def test_v4_routed_experts_are_fp4_in_the_source(name):
    source = planned(name, None).source
    parts = {p.label.split(":")[0]: p for p in source.parts}
    fp4 = parts["FP4 e2m1 + e8m0 scale per 32 columns"]
    fp8 = parts["FP8 e4m3 + e8m0 128x128 block scales"]
    # half a byte per weight plus a one-byte scale per 32: 4.25 bits; FP8 with one byte per 128 x 128 block
    assert 4.0 < fp4.bits_per_weight < 5.0 and fp4.bits_per_weight == pytest.approx(4.25)
    assert 8.0 < fp8.bits_per_weight < 8.01
    assert fp4.parameters == dict(planned(name, None).parameters.by_category)["routed experts (fused)"]
    assert sum(p.bytes for p in source.parts) + source.unused.bytes == source.tensor_bytes
    # INT4 g128 is smaller than the FP4 source; INT4 g32 with 16-bit scales (4.5 bits) is not
    rows = {s.label: s.tensor_bytes for s in planned(name).schemes}
    assert rows["INT4 g128 sym"] < source.tensor_bytes < rows["INT4 g32 sym"] < rows["INT8 per-channel sym"]


def test_v32_source_keeps_the_indexer_weights_projection_unscaled():
    """transformers' ``_keep_in_fp32_modules`` (``indexer.weights_proj``): bfloat16 in the published files."""
    plan = planned("deepseek-v3.2", None)
    cfg = config("deepseek-v3.2")
    (fp8,) = [p for p in plan.source.parts if p.label.startswith("FP8")]
    by = dict(plan.parameters.by_category)
    routed = by["routed experts (fused)"]
    unscaled = cfg["num_hidden_layers"] * cfg["index_n_heads"] * cfg["hidden_size"]
    assert fp8.parameters == by["attention Linears"] + by["dense MLP Linears"] + by["shared-expert Linears"] + routed - unscaled


# ----------------------------------------------------------------------------- plans


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_cli_prints_every_table(name, capsys):
    assert main(["plan", str(PUBLIC / name), str(RECIPES / "gptq_int4_g128.yaml"), "dtype=bfloat16"]) == 0
    text = capsys.readouterr().out
    for heading in ("## Parameters", "## Decoder layers", "## Weights on disk", "## Peak memory (estimate)",
                    "## Calibration compute (estimate)", "## Notes"):
        assert heading in text
    assert "no KV cache is counted" in text
    if name.startswith("deepseek-v4"):
        assert "| compressed_sparse_attention (KV 1:4, indexer) |" in text
        assert "| heavily_compressed_attention (KV 1:128) |" in text
        assert re.search(r"FP4 e2m1 \+ e8m0 scale per 32 columns: routed experts: .* 4\.25 bits per weight", text)
        assert "hyper-connection streams" in text and "(mtp.0.*)" in text
    else:
        assert "| indexed_attention (indexer) |" in text


def test_v4_flash_layers_alternate_and_fold_into_four_rows():
    plan = planned("deepseek-v4-flash")
    text = plan.to_markdown()
    assert "| 3, 5, ..., 41 |" in text and "| 4, 6, ..., 42 |" in text and "| 0-1 |" in text
    kinds = [(p.compress_rate, p.indexer) for p in plan.layers]
    assert kinds[:2] == [(0, False)] * 2
    assert kinds[2::2] == [(4, True)] * 21 and kinds[3::2] == [(128, False)] * 20
    assert all(p.moe for p in plan.layers)


@pytest.mark.parametrize("recipe", METHODS)
def test_v4_flash_plans_for_each_method(recipe):
    plan = planned("deepseek-v4-flash", recipe)
    assert plan.streaming.total < plan.in_memory.total and plan.accelerator.total < plan.streaming.total
    rows = {s.label: s.tensor_bytes for s in plan.schemes}
    assert plan.schemes[-1].tensor_bytes == rows["INT4 g32 sym" if recipe.endswith("g32") else "INT4 g128 sym"]
    calibrated = recipe != "int4_g32"
    assert (max(p.statistics_bytes for p in plan.layers) > 0) is calibrated
    assert (plan.time.total_flops > 1e15) is calibrated
    assert all(p.temporary_bytes > 0 for p in plan.layers)


def test_v4_gptq_holds_a_hessian_per_expert_input():
    plan = planned("deepseek-v4-flash")
    cfg = config("deepseek-v4-flash")
    h, inter, experts = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    hessians = experts * 8 * (h * h + inter * inter)  # fp64 [K, K] sums per expert for gate_up (K = H) and down (K = I)
    # plus the largest batched solve: expert_chunk (8) gate_up weights [2I, H], 8 weight and 3 Hessian fp32 copies each
    solve = 8 * 4 * (8 * 2 * inter * h + 3 * h * h)
    assert all(hessians + solve <= p.statistics_bytes <= 1.1 * hessians + solve for p in plan.layers)


def test_v4_calibration_activations_carry_every_hyper_connection_stream():
    plan = planned("deepseek-v4-flash")
    cfg = config("deepseek-v4-flash")
    parts = dict(plan.streaming.parts)
    (label,) = [k for k in parts if k.startswith("calibration activations")]
    recipe = load_recipe(RECIPES / "gptq_int4_g128.yaml", ["dtype=bfloat16"]).quantize.calibration_section
    # inputs and outputs of a layer: [samples, seq_len, hc_mult, hidden] in bfloat16 each
    assert parts[label] == 2 * recipe.samples * recipe.seq_len * cfg["hc_mult"] * cfg["hidden_size"] * 2
    assert f"x {cfg['hc_mult']} x {cfg['hidden_size']})" in label


def test_v4_streaming_peak_is_one_whole_decoder_layer():
    """The largest layer is a CSA layer: its compressor and indexer, its hyper-connection parameters (float32)
    and its hash table or router bias are all part of what one streamed layer holds."""
    plan = planned("deepseek-v4-flash")
    parts = dict(plan.streaming.parts)
    (label,) = [k for k in parts if k.startswith("largest decoder layer")]
    index = int(re.search(r"layer (\d+)", label).group(1))
    layer = plan.layers[index]
    assert layer.indexer and layer.compress_rate == 4
    assert parts[label] == layer.working_bytes == max(p.working_bytes for p in plan.layers)
    hca = plan.layers[3]
    assert hca.compress_rate == 128 and hca.working_bytes < layer.working_bytes
    cfg = config("deepseek-v4-flash")
    hc = cfg["hc_mult"]
    mixers = 2 * (2 + hc) * hc * hc * cfg["hidden_size"]  # attn_hc.fn and ffn_hc.fn, float32 when loaded
    experts = 3 * cfg["n_routed_experts"] * cfg["moe_intermediate_size"] * cfg["hidden_size"]
    assert layer.parameters > experts + mixers
    assert layer.working_bytes > 2 * (layer.parameters - mixers) + 4 * mixers


def test_v4_pro_gptq_does_not_fit_one_accelerator():
    plan = planned("deepseek-v4-pro")
    assert plan.accelerator.total > 139 * GiB  # an H200: the Hessians of 384 experts of one layer alone are ~90 GiB
    assert plan.time.seconds(50) > 3600


# ----------------------------------------------------------------------------- checkpoints with weights


def test_tiny_v4_checkpoint_headers_map_to_the_model(tmp_path):
    """transformers writes V4 tensors under their original names (``layers.N.attn.wq_a``, ``ffn.experts.E.w1``...);
    the plan maps them back as its loader does, and predicts the artifact's bytes exactly."""
    root = make_tiny_checkpoint("deepseek_v4", tmp_path / "ckpt")
    plan = plan_checkpoint(root, load_recipe(None, ["quantize.weights.group_size=32"]))
    assert plan.source.missing == () and plan.source.unused is None
    assert plan.source.header_parameters == plan.parameters.total + plan.parameters.buffers
    assert "matches the model" in plan.to_markdown()
    artifact = make_rtn_artifact(root, tmp_path / "artifact")
    assert plan.schemes[-1].tensor_bytes == tensor_data_bytes(sorted(artifact.glob("*.safetensors")))


def _official_layout(model: torch.nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of ``model`` as DeepSeek-V4's published checkpoints store it: FP8 Linears with one e8m0 scale per
    128 x 128 block (``.scale``), routed experts FP4 two per int8 with an e8m0 scale per 32 columns, the Linears
    transformers keeps out of FP8 in bfloat16, integer tables in int64, the rest in float32 or bfloat16."""
    from dsq.core.layout import disk_names

    modules = dict(model.named_modules())
    unscaled = tuple(model._keep_in_fp32_modules)
    fp32 = re.compile("|".join(model._keep_in_fp32_modules_strict))
    layout = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        owner = name.rpartition(".")[0]
        linear = isinstance(modules.get(owner), torch.nn.Linear) and ".layers." in name and not owner.endswith(unscaled)
        expert = owner.endswith(".experts")
        for disk, shape in disk_names(model, name, tensor):
            if expert:
                out, inp = shape
                layout[disk] = ("I8", (out, inp // 2))
                layout[disk.removesuffix(".weight") + ".scale"] = ("F8_E8M0", (out, inp // 32))
            elif linear:
                out, inp = shape
                layout[disk] = ("F8_E4M3", shape)
                layout[disk.removesuffix(".weight") + ".scale"] = ("F8_E8M0", (math.ceil(out / 128), math.ceil(inp / 128)))
            elif not tensor.dtype.is_floating_point:
                layout[disk] = ("I64", shape)
            else:
                layout[disk] = ("F32" if fp32.search(name) else "BF16", shape)
    return layout


TORCH_DTYPES = {"I8": torch.int8, "F8_E8M0": torch.float8_e8m0fnu, "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64,
                "F32": torch.float32, "BF16": torch.bfloat16}


def test_official_v4_layout_checkpoint_agrees_with_the_config_computation(tmp_path):
    """A checkpoint in the published FP8 + FP4 layout (official names, no ``model.`` prefix) holds the model's
    elements (FP4 counted two per byte) in exactly the bytes the config-only plan computes for its config."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    shapes = {"num_nextn_predict_layers": 0, "moe_intermediate_size": 128, "hidden_size": 256, "q_lora_rank": 128}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("deepseek_v4", **shapes))
    cfg = tiny_config("deepseek_v4", **shapes).to_dict()
    cfg.update(expert_dtype="fp4", torch_dtype="bfloat16", quantization_config={
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128]})
    weights, config_only = tmp_path / "weights", tmp_path / "config-only"
    for root in (weights, config_only):
        root.mkdir()
        (root / "config.json").write_text(json.dumps(cfg))
    tensors = {name.removeprefix("model."): torch.zeros(shape, dtype=TORCH_DTYPES[dtype])
               for name, (dtype, shape) in _official_layout(model).items()}
    save_file(tensors, str(weights / "model.safetensors"))

    plan = plan_checkpoint(weights)
    from_headers, from_config = plan.source, plan_checkpoint(config_only).source
    assert from_headers.missing == () and from_headers.unused is None
    assert from_headers.header_parameters == plan.parameters.total + plan.parameters.buffers
    assert "FP4 e2m1" in from_headers.storage and "FP8 e4m3" in from_headers.storage
    assert from_config.unused is None and from_config.tensor_bytes == from_headers.tensor_bytes
    assert any(p.label.startswith("FP4") and p.bits_per_weight == pytest.approx(4.25) for p in from_config.parts)
