"""DeepSeek-V4 and V3.2 through dsq's quantization: every Linear and routed expert, what is kept, reload."""
from __future__ import annotations

import json

import pytest
import torch

from dsq.core.layout import expert_projections
from dsq.core.loading import load_checkpoint
from dsq.eval.reload import transformers_reload_check
from dsq.quantize import (
    AWQConfig, GPTQConfig, PerChannel, PerGroup, QuantExperts, QuantLinear, RTNConfig, TargetSpec, W8A8Config, WeightScheme, quantize_,
)
from dsq.quantize.artifact_load import load_artifact
from dsq.quantize.methods.autoround import AutoRoundConfig
from dsq.quantize.artifact_save import save_quantized_model
from dsq.quantize.mappings import unbalanced, without_balance
from dsq.quantize.modules import apply_linear
from dsq.quantize.sequential import decoder_layers
from dsq.quantize.w8a8 import W8A8Linear
from dsq.tools.testing import fold_every_mapping

NEW_ARCHS = ["deepseek_v4", "deepseek_v32"]
SCHEME = WeightScheme(4, PerGroup(32))
EVERYTHING = TargetSpec(indexer=True)  # the DSA indexers too (kept by default)


def _ids(vocab: int, samples: int = 8, seq: int = 40, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, vocab, (samples, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ----------------------------------------------------------------------------- mappings


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_balance_mappings_fold_exactly(tiny_checkpoint, arch):
    """Every mapping that resolves in a V4 / V3.2 layer, folded with a random scale, leaves the logits unchanged."""
    model = load_checkpoint(tiny_checkpoint(arch)).model
    ids = _ids(model.config.vocab_size, 2, 40)
    ref = _logits(model, ids)
    applied = {(m.smooth, m.balance) for m in fold_every_mapping(model, torch.Generator().manual_seed(1))}
    assert (_logits(model, ids) - ref).abs().max() < 1e-4
    smooths = {s for s, _ in applied}
    if arch == "deepseek_v4":
        # every attention kind's input row, the grouped output projection, the query norm
        assert {len(b) for s, b in applied if s == "input_layernorm"} == {2, 4, 7}
        assert {"self_attn.o_a_proj", "self_attn.q_a_norm", "post_attention_layernorm"} <= smooths
        assert "mlp.experts" not in smooths and "mlp.shared_experts.up_proj" not in smooths  # clamped: not foldable
    else:
        assert ("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.indexer.wk",
                                    "self_attn.indexer.weights_proj")) in applied
        assert ("self_attn.q_a_layernorm", ("self_attn.q_b_proj", "self_attn.indexer.wq_b")) in applied
        assert "mlp.experts" in smooths


def test_v4_clamped_activation_rows_are_named_not_folded(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint("deepseek_v4")).model
    prefix, layers = decoder_layers(model)
    skipped = {m.smooth for m, _ in unbalanced(layers[1])}
    assert skipped == {"mlp.shared_experts.up_proj", "mlp.experts"}
    names = {f"{prefix}.1.{n}" for n in ("self_attn.o_a_proj", "mlp.shared_experts.down_proj", "mlp.experts")}
    missing = without_balance(f"{prefix}.1", layers[1], names)
    assert "no foldable op" in missing[f"{prefix}.1.self_attn.o_a_proj"]
    assert "swiglu_limit" in missing[f"{prefix}.1.mlp.shared_experts.down_proj"]
    assert "swiglu_limit" in missing[f"{prefix}.1.mlp.experts.down_proj"]


# ----------------------------------------------------------------------------- grouped output projection


def test_grouped_linear_matches_transformers_and_keeps_the_grouped_matmul(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint("deepseek_v4")).model
    o_a = model.model.layers[1].self_attn.o_a_proj
    x = torch.randn(2, 5, o_a.n_groups, o_a.in_features)
    with torch.no_grad():
        torch.testing.assert_close(apply_linear(x, o_a.weight, None, o_a.n_groups), o_a(x))
    quantize_(model, RTNConfig(SCHEME), progress=False)
    q = model.model.layers[1].self_attn.o_a_proj
    assert isinstance(q, QuantLinear) and q.n_groups == o_a.n_groups
    with torch.no_grad():
        w = q.weight_q.dequantize(torch.float32)
        # block-diagonal: group g's output uses only group g's input
        dense = torch.block_diag(*w.view(q.n_groups, -1, q.in_features))  # (G*d_g, G*in_g)
        torch.testing.assert_close(q(x).flatten(-2), x.flatten(-2) @ dense.T, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- every method


def _check_quantized(model, report, arch: str) -> None:
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    assert linears == [n for n in linears if n.endswith(".gate")], f"Linears left in float: {linears}"  # routers only
    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    assert len(experts) == sum(1 for t in model.config.mlp_layer_types if t != "dense")
    kept = report.other_breakdown
    assert kept["norms"] > 0 and kept["router"] > 0
    if arch == "deepseek_v4":
        assert {"hyper_connections", "attention_sinks", "position_biases", "hash_table"} <= kept.keys(), kept
        grouped = [m for n, m in model.named_modules() if n.endswith("o_a_proj")]
        assert grouped and all(isinstance(m, QuantLinear) and m.n_groups for m in grouped)
        assert any(n.endswith("indexer.q_b_proj") and isinstance(m, QuantLinear) for n, m in model.named_modules())
    else:
        assert any(n.endswith("indexer.wk") and isinstance(m, QuantLinear) for n, m in model.named_modules())


@pytest.mark.parametrize("arch", NEW_ARCHS)
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "autoround"])
def test_every_linear_and_expert_quantized_and_transformers_reloads_it(tiny_checkpoint, tmp_path, arch, method):
    loaded = load_checkpoint(tiny_checkpoint(arch))
    model = loaded.model
    ids = _ids(model.config.vocab_size)
    ref = _logits(model, ids[:2])
    config = {"rtn": RTNConfig(SCHEME, EVERYTHING), "gptq": GPTQConfig(SCHEME, EVERYTHING, batch_size=4),
              "awq": AWQConfig(SCHEME, EVERYTHING, batch_size=4),
              "autoround": AutoRoundConfig(SCHEME, EVERYTHING, steps=5, batch_size=4)}[method]
    report = quantize_(model, config, calibration=None if method == "rtn" else ids, progress=False)
    _check_quantized(model, report, arch)
    out = _logits(model, ids[:2])
    assert torch.isfinite(out).all() and (out - ref).abs().mean() < 0.5 * ref.abs().mean()
    save_quantized_model(model, loaded.tokenizer, tmp_path)
    check = transformers_reload_check(tmp_path, model)
    assert check.passed, check
    own = load_artifact(tmp_path).model
    torch.testing.assert_close(_logits(own, ids[:2]), out, rtol=0, atol=1e-5)
    if arch == "deepseek_v4":
        stored = {k for f in tmp_path.glob("*.safetensors") for k in __import__("safetensors").safe_open(f, "pt").keys()}
        names = expert_projections(model)
        assert any(k.endswith(f".experts.0.{names.gate}.weight_packed") for k in stored)  # official per-expert layout
    if method == "gptq" and arch == "deepseek_v4":
        groups = [n for n in report.calibration["modules"] if ".o_a_proj.group." in n]
        assert len(groups) == 4 * model.config.o_groups  # one solve (own Hessian) per group and layer
    if method == "awq":
        assert any("o_a_proj" in n and "no foldable op" in n for n in report.notes) == (arch == "deepseek_v4"), report.notes
    if method == "autoround":  # every block trained (the grouped o_a_proj and the clamped experts included)
        blocks = {n: f for n, f in report.calibration["modules"].items() if "loss_before" in f}
        assert len(blocks) == model.config.num_hidden_layers and all(f["loss_after"] <= f["loss_before"] for f in blocks.values())


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_w8a8_smoothquant_runs_grouped_int8_and_reloads(tiny_checkpoint, tmp_path, arch):
    loaded = load_checkpoint(tiny_checkpoint(arch))
    model = loaded.model
    ids = _ids(model.config.vocab_size)
    ref = _logits(model, ids[:2])
    report = quantize_(model, W8A8Config(targets=EVERYTHING, batch_size=4), calibration=ids, progress=False)
    out = _logits(model, ids[:2])
    assert (out - ref).abs().mean() < 0.1 * ref.abs().mean()  # whole model; the indexer's top-k may flip
    if arch == "deepseek_v4":
        o_a = model.model.layers[1].self_attn.o_a_proj
        assert isinstance(o_a, W8A8Linear) and o_a.n_groups == model.config.o_groups
        x = torch.randn(3, 7, o_a.n_groups, o_a.in_features)
        with torch.no_grad():
            exact = apply_linear(x, o_a.weight_q.dequantize(torch.float32), None, o_a.n_groups)
            assert ((o_a(x) - exact).abs().max() / exact.abs().max()) < 0.02  # int8 activations per token and group
        assert any("swiglu_limit" in n for n in report.notes), report.notes
    save_quantized_model(model, loaded.tokenizer, tmp_path)
    torch.testing.assert_close(_logits(load_artifact(tmp_path).model, ids[:2]), out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_indexer_is_kept_by_default_and_listed(tiny_checkpoint, arch):
    model = load_checkpoint(tiny_checkpoint(arch)).model
    report = quantize_(model, RTNConfig(SCHEME), progress=False)
    kept = {r.name: r.reason for r in report.kept}
    indexer = [n for n, m in model.named_modules() if ".indexer." in n and isinstance(m, torch.nn.Linear)]
    assert indexer and all("DSA indexer" in kept[n] for n in indexer)
    assert not [n for n in kept if ".indexer." not in n and not n.endswith("lm_head")]  # everything else quantized


def test_v4_hash_routed_layer_gets_routed_token_counts(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint("deepseek_v4")).model
    ids = _ids(model.config.vocab_size)
    table = model.model.layers[0].mlp.gate.tid2eid
    with torch.no_grad():
        table.copy_(torch.arange(table.numel()).view_as(table) % model.config.n_routed_experts)
    report = quantize_(model, GPTQConfig(SCHEME, batch_size=4), calibration=ids, progress=False)
    counts = report.calibration["expert_routed_tokens"]["model.layers.0.mlp.experts"]
    expected = torch.bincount(table[ids.flatten()].flatten(), minlength=model.config.n_routed_experts)
    assert counts == expected.tolist()  # the driver carried the token ids the hash router needs


# ----------------------------------------------------------------------------- streaming


def _tensors(root) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(f))
    return out


STREAM_CASES = [
    ("deepseek_v4", "bf16", RTNConfig(SCHEME)),
    ("deepseek_v4", "bf16", GPTQConfig(SCHEME, batch_size=4)),
    ("deepseek_v4", "bf16", AWQConfig(SCHEME, grid=3, batch_size=4)),
    ("deepseek_v4", "fp8+fp4", RTNConfig(SCHEME)),
    ("deepseek_v4", "fp8+fp4", GPTQConfig(SCHEME, batch_size=4)),
    ("deepseek_v4", "fp8+fp4", AWQConfig(SCHEME, grid=3, batch_size=4)),
    ("deepseek_v32", "bf16", RTNConfig(SCHEME)),
    ("deepseek_v32", "bf16", GPTQConfig(SCHEME, batch_size=4)),
    ("deepseek_v32", "bf16", AWQConfig(SCHEME, grid=3, batch_size=4)),
    ("deepseek_v32", "fp8", RTNConfig(SCHEME)),
    ("deepseek_v32", "fp8", GPTQConfig(SCHEME, batch_size=4)),
    ("deepseek_v32", "fp8", AWQConfig(SCHEME, grid=3, batch_size=4)),
]


@pytest.mark.parametrize("arch,source,config", STREAM_CASES, ids=[f"{a}-{s}-{type(c).__name__}" for a, s, c in STREAM_CASES])
def test_streamed_artifact_is_identical_to_in_memory(tmp_path, tiny_checkpoint, arch, source, config):
    from dsq.quantize.streaming import quantize_streaming
    from dsq.tools.official_v4 import write_official_v4
    from dsq.tools.synthetic import write_synthetic_checkpoint

    src = tiny_checkpoint(arch)
    if source == "fp8+fp4":  # V4's official mix: FP8 e4m3 + e8m0 block scales, FP4 e2m1 routed experts
        src = write_official_v4(src, tmp_path / "official", shards=2)
    if source == "fp8":  # V3.2's official format: FP8 e4m3 + fp32 128x128 block scales, sharded
        model_config = {**json.loads((src / "config.json").read_text()), "vocab_size": 2048}  # the bundled tokenizer's
        src = write_synthetic_checkpoint(tmp_path / "fp8", model_config, fp8=True, max_shard_bytes=256 << 10, seed=3)
    ids = _ids(512, 4, 40)
    loaded = load_checkpoint(src, dtype=torch.bfloat16)
    quantize_(loaded.model, config, calibration=ids, progress=False)
    (tmp_path / "mem").mkdir()
    save_quantized_model(loaded.model, loaded.tokenizer, tmp_path / "mem", dtype_name="bfloat16")
    (tmp_path / "stream").mkdir()
    quantize_streaming(src, tmp_path / "stream", config, calibration=ids, dtype=torch.bfloat16, progress=False,
                       max_shard_bytes=256 << 10)
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "stream")
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


# ----------------------------------------------------------------------------- the other stages


def test_lora_default_targets_for_v4_and_v32(tiny_checkpoint):
    from dsq.finetune.lora_targets import adaptable_kind, default_targets

    v4 = load_checkpoint(tiny_checkpoint("deepseek_v4")).model
    leaves = {n.split(".", 3)[-1] for n in default_targets(v4)}
    assert leaves == {"self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_proj", "self_attn.o_b_proj",
                      "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"}
    assert adaptable_kind(v4.model.layers[0].self_attn.o_a_proj) is None  # grouped: refused if asked for
    v32 = load_checkpoint(tiny_checkpoint("deepseek_v32")).model
    assert not [n for n in default_targets(v32) if ".indexer." in n]
    assert any(n.endswith("self_attn.kv_b_proj") for n in default_targets(v32))


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_onnx_export_is_refused_naming_the_attention_part(tiny_checkpoint, tmp_path, arch, capsys):
    from dsq.cli import main
    from dsq.core.errors import ExportError
    from dsq.export import export_onnx

    loaded = load_checkpoint(tiny_checkpoint(arch))
    with pytest.raises(ExportError, match="indexer"):
        export_onnx(loaded.model, loaded.tokenizer, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
    recipe = __import__("pathlib").Path(__file__).resolve().parents[2] / "recipes" / "gptq_int4_onnx.yaml"
    code = main(["run", str(recipe), f"model={tiny_checkpoint(arch)}", f"output={tmp_path / 'run'}", "-q"])
    assert code == 2 and "recipe key export" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_auto_streaming_counts_fp4_experts_as_values_not_bytes(tiny_checkpoint, tmp_path):
    from dsq.core.checkpoint import inspect_checkpoint
    from dsq.run.streaming import checkpoint_values
    from dsq.tools.official_v4 import write_official_v4

    src = tiny_checkpoint("deepseek_v4")
    official = write_official_v4(src, tmp_path / "official")
    assert checkpoint_values(inspect_checkpoint(official)) == checkpoint_values(inspect_checkpoint(src))


def test_qat_on_v4_keeps_the_grouped_projection_and_converts_to_what_it_trained(tiny_checkpoint):
    from dsq.finetune.qat import FakeQuantLinear, QATConfig, convert_qat, prepare_qat

    model = load_checkpoint(tiny_checkpoint("deepseek_v4")).model
    ids = _ids(model.config.vocab_size, 2, 40)
    prepare_qat(model, QATConfig(SCHEME))
    fq = model.model.layers[1].self_attn.o_a_proj
    assert isinstance(fq, FakeQuantLinear) and fq.n_groups == model.config.o_groups
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert fq.weight.grad is not None and torch.isfinite(fq.weight.grad).all()
    model.zero_grad()
    trained = _logits(model, ids)
    convert_qat(model)
    q = model.model.layers[1].self_attn.o_a_proj
    assert isinstance(q, QuantLinear) and q.n_groups == model.config.o_groups
    torch.testing.assert_close(_logits(model, ids), trained, rtol=0, atol=1e-4)


@pytest.mark.parametrize("scheme", [
    WeightScheme(8, PerChannel()), WeightScheme(4, PerGroup(128)), WeightScheme(4, PerGroup(48), symmetric=False),
    WeightScheme(8, PerGroup(32), symmetric=False),
], ids=lambda s: s.describe())
def test_v4_artifact_reads_back_bit_exactly_in_every_scheme(tiny_checkpoint, tmp_path, scheme):
    loaded = load_checkpoint(tiny_checkpoint("deepseek_v4"))
    model = loaded.model
    quantize_(model, RTNConfig(scheme, EVERYTHING), progress=False)
    save_quantized_model(model, loaded.tokenizer, tmp_path)
    own = load_artifact(tmp_path).model
    mine = dict(model.named_modules())
    for name, module in own.named_modules():
        if isinstance(module, (QuantLinear, QuantExperts)):
            ref = mine[name]
            for attr in ("weight_q",) if isinstance(module, QuantLinear) else ("gate_up_proj", "down_proj"):
                a, b = getattr(module, attr), getattr(ref, attr)
                assert torch.equal(a.dequantize(torch.float32), b.dequantize(torch.float32)), f"{name}.{attr}"
    ids = _ids(model.config.vocab_size, 2, 40)
    torch.testing.assert_close(_logits(own, ids), _logits(model, ids), rtol=0, atol=1e-5)


def test_hash_table_stored_as_floats_is_refused_naming_it(tiny_checkpoint, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from dsq.cli import main

    src = tmp_path / "v4"
    shutil.copytree(tiny_checkpoint("deepseek_v4"), src)
    tensors = load_file(src / "model.safetensors")
    name = next(k for k in tensors if k.endswith("tid2eid"))
    tensors[name] = tensors[name].float()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    recipe = __import__("pathlib").Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"
    assert main(["run", str(recipe), f"model={src}", f"output={out}", "-q"]) == 2
    err = capsys.readouterr().err
    assert name in err and "integers" in err, err
    assert not out.exists()
