"""Routed experts as one ONNX Runtime MoE / QMoE node per layer: same numbers as the sparse form and as torch."""
from __future__ import annotations

import copy
import json
import warnings
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from dsq.cli import main
from dsq.core.errors import RecipeError
from dsq.core.loading import load_checkpoint
from dsq.eval.speed import TorchCachedLM
from dsq.export import DequantizeLinearWeights, OrtCausalLM, export_onnx
from dsq.export.onnx_export import _export_copies
from dsq.export.modules import DenseRoutedExperts, SparseRoutedExperts, prepare_for_export, translation_table
from dsq.export.moe_op import FusedRoutedExperts, QMoELayout, ort_refusal, qmoe_dequantize
from dsq.quantize import PerChannel, PerGroup, RTNConfig, TargetSpec, W8A8Config, WeightScheme, quantize_
from dsq.quantize.w8a8 import DynamicPerToken
from dsq.run.export_step import export_config
from dsq.run.recipe import load_recipe
from dsq.tools.testing import fast_export_config, make_tiny_checkpoint, onnx_logits_gap

EXPERTS = "model.layers.1.mlp.experts"  # the tiny DeepSeek models' MoE layer (8 experts, top-2)
FAST = fast_export_config()
# schemes QMoE carries exactly (None: fp32 experts, the MoE op)
CARRIED = {
    "fp": None,
    "int4-g32-asym": WeightScheme(4, PerGroup(32), False),
    "int4-g16-sym": WeightScheme(4, PerGroup(16), True),
    "int4-ch-sym": WeightScheme(4, PerChannel(), True),
    "int8-ch-asym": WeightScheme(8, PerChannel(), False),
}


def _model(checkpoint, scheme: WeightScheme | None) -> nn.Module:
    model = load_checkpoint(checkpoint).model
    if scheme is not None:
        quantize_(model, RTNConfig(scheme, TargetSpec()), progress=False)
    return model


def _routing(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden (T, 128)``, distinct ``top_k_index (T, 2)`` of 8 experts, ``top_k_weights (T, 2)`` with zeros:
    token 0 has both weights 0, token 1 one weight 0 (the op's log-weight routing clamps them)."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2, generator=gen) * 2.5  # DeepSeek scales the weights (routed_scaling_factor)
    weights[0] = 0.0
    if tokens > 1:
        weights[1, 0] = 0.0
    return torch.randn(tokens, 128, generator=gen), index, weights


def _forms(model: nn.Module) -> tuple[nn.Module, nn.Module, dict]:
    """(sparse experts, fused experts, the fused plan's manifest entry) of ``model``'s MoE layer."""
    sparse_model, fused_model = copy.deepcopy(model), copy.deepcopy(model)
    prepare_for_export(sparse_model)
    plan = prepare_for_export(fused_model, moe_op=True)
    return sparse_model.get_submodule(EXPERTS), fused_model.get_submodule(EXPERTS), plan.to_dict()["routed_experts"]


def _deinterleave(w: torch.Tensor) -> torch.Tensor:
    return torch.cat([w[0::2], w[1::2]])  # [g0, u0, g1, u1, ...] -> [gate; up]


@pytest.mark.parametrize("name", CARRIED)
def test_fused_experts_carry_dsq_integers_and_equal_the_sparse_form_in_torch(tiny_checkpoint, name):
    scheme = CARRIED[name]
    model = _model(tiny_checkpoint("deepseek_v3"), scheme)
    original = model.get_submodule(EXPERTS)
    sparse, fused, routed = _forms(model)
    assert isinstance(sparse, SparseRoutedExperts) and isinstance(fused, FusedRoutedExperts)
    assert routed == {EXPERTS: {"experts": 8, "form": "ort_moe" if scheme is None else "ort_qmoe"}}
    for e in range(8):  # the node's weights are dsq's, bit for bit (gate/up rows interleaved)
        if scheme is None:
            assert torch.equal(_deinterleave(fused.fc1[e]), original.gate_up_proj[e].detach())
            assert torch.equal(fused.fc2[e], original.down_proj[e].detach())
            continue
        lay = fused.layout
        z1 = fused.fc1_zero_points[e] if fused.fc1_zero_points is not None else None
        z2 = fused.fc2_zero_points[e] if fused.fc2_zero_points is not None else None
        assert (z1 is None) == scheme.symmetric
        w1 = qmoe_dequantize(fused.fc1[e], fused.fc1_scales[e], z1, lay.bits, lay.block_size)
        w2 = qmoe_dequantize(fused.fc2[e], fused.fc2_scales[e], z2, lay.bits, lay.block_size)
        assert torch.equal(_deinterleave(w1), original.gate_up_proj.dequantize(torch.float32, e))
        assert torch.equal(w2, original.down_proj.dequantize(torch.float32, e))
    with torch.no_grad():
        for tokens, seed in ((1, 0), (3, 1), (40, 2)):
            hidden, index, weights = _routing(tokens, seed)
            ours = fused(hidden, index, weights)
            torch.testing.assert_close(ours, sparse(hidden, index, weights), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours, original(hidden, index, weights), atol=1e-5, rtol=1e-5)
            assert torch.equal(ours[0], torch.zeros(128))  # both weights 0: no contribution


class _Experts(nn.Module):
    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, hidden, top_k_index, top_k_weights):
        return self.experts(hidden, top_k_index, top_k_weights)


@pytest.mark.parametrize("name", ["fp", "int4-g32-asym", "int4-ch-sym", "int8-ch-asym"])
def test_one_fused_node_in_onnxruntime_matches_the_torch_reference(tiny_checkpoint, tmp_path, name):
    scheme = CARRIED[name]
    _, fused, _ = _forms(_model(tiny_checkpoint("deepseek_v3"), scheme))
    tokens = torch.export.Dim("tokens")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_Experts(fused), _routing(5, 0), None, dynamo=True, opset_version=21,
                                    dynamic_shapes=({0: tokens}, {0: tokens}, {0: tokens}),
                                    custom_translation_table=translation_table(), verbose=False)
    program.save(str(tmp_path / "experts.onnx"))
    graph = onnx.load(str(tmp_path / "experts.onnx")).graph
    (node,) = [n for n in graph.node if n.domain == "com.microsoft"]
    assert {n.op_type for n in graph.node}.isdisjoint({"MatMul", "MatMulNBits", "Split", "ScatterND"})
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (node.op_type, attrs["k"], attrs["swiglu_fusion"], attrs["activation_type"]) == (
        "MoE" if scheme is None else "QMoE", 2, 1, b"swiglu")
    assert (attrs["activation_alpha"], attrs["activation_beta"], attrs["normalize_routing_weights"]) == (1.0, 0.0, 0)
    if scheme is not None:
        assert attrs["expert_weight_bits"] == scheme.bits
        assert attrs.get("block_size", 0) == (0 if isinstance(scheme.granularity, PerChannel) else scheme.granularity.size)
        assert (len(node.input) > 11 and node.input[11] != "") is (not scheme.symmetric)  # fc1_zero_points
    session = ort.InferenceSession(str(tmp_path / "experts.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for tokens, seed in ((1, 3), (4, 4), (33, 5)):
        inputs = _routing(tokens, seed)
        got = session.run(None, dict(zip(names, (t.numpy() for t in inputs))))[0]
        want = fused(*inputs).numpy()
        # float rounding only (accumulation order, one log/exp per routing weight): |y| ~ 1
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        assert np.array_equal(got[0], np.zeros(128, np.float32))


def _per_expert_weights(path) -> list[str]:
    """Initializers of one expert's matmul (the sparse form's ``...experts.experts.N.gate_up...``)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return [t.name for t in graph.initializer if ".experts.experts." in t.name]


def _fused_graph_checks(result, loaded, form: str, scheme: WeightScheme | None) -> None:
    """Validation passed, one fused node per MoE layer, no per-expert matmul, the manifest names the form."""
    v = result.validation
    assert v.passed and v.greedy_equal and {c.kind for c in v.cases} == {"prefill", "decode", "greedy"}
    c = loaded.model.config
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace
    op = "com.microsoft::MoE" if scheme is None else "com.microsoft::QMoE"
    assert result.ops[op] == moe_layers and result.plan.fused == {EXPERTS: form}
    assert result.ops.get("com.microsoft::MatMulNBits", 0) == len(result.plan.nbits) - (moe_layers if scheme else 0)
    assert not _per_expert_weights(result.onnx_path)
    manifest = json.loads((result.path / "export_manifest.json").read_text())
    assert manifest["quantized_modules"]["routed_experts"] == {EXPERTS: {"experts": c.n_routed_experts, "form": form}}
    assert manifest["ops"][op] == moe_layers
    prompt = torch.tensor([[0, 17, 42, 99, 7, 300, 12]])
    lm, ref = OrtCausalLM(result.path), TorchCachedLM(loaded.model)
    torch.testing.assert_close(lm.prefill(prompt), ref.prefill(prompt), atol=v.tolerance, rtol=0)
    for token in (5, 250):
        step = torch.tensor([token])
        torch.testing.assert_close(lm.decode(step), ref.decode(step), atol=v.tolerance, rtol=0)


@pytest.mark.parametrize("variant", ["fp", "int4"])
def test_fused_export_matches_torch_and_the_sparse_export(exported, tiny_checkpoint, tmp_path, capsys, variant):
    loaded, fused = exported("deepseek_v3", variant)
    scheme = None if variant == "fp" else WeightScheme(4, PerGroup(32), False)  # the fixture's RTN
    _fused_graph_checks(fused, loaded, "ort_moe" if variant == "fp" else "ort_qmoe", scheme)
    if variant == "fp":  # the CLI flag gives the sparse graph
        sparse = tmp_path / "sparse"
        code = main(["export", str(tiny_checkpoint("deepseek_v3")), "-o", str(sparse), "--no-moe-op", "-q"])
        assert code == 0, capsys.readouterr().err
    else:
        sparse = exported("deepseek_v3", variant, moe_op=False)[1].path
    manifest = json.loads((sparse / "export_manifest.json").read_text())
    assert manifest["quantized_modules"]["routed_experts"] == {EXPERTS: {"experts": 8, "form": "sparse"}}
    assert "com.microsoft::MoE" not in manifest["ops"] and "com.microsoft::QMoE" not in manifest["ops"]
    assert len({n.split(".experts.experts.")[1].split(".")[0] for n in _per_expert_weights(sparse / "model.onnx")}) == 8
    assert onnx_logits_gap(fused.path, sparse) <= 1e-5  # same logits within float rounding


@pytest.mark.parametrize("arch, scheme, overrides", [
    ("deepseek_v2", WeightScheme(4, PerChannel(), True), {}),
    ("deepseek_v3", WeightScheme(4, PerGroup(128), True), {"moe_intermediate_size": 128}),  # whole 128-blocks
], ids=["v2-int4-ch", "v3-int4-g128"])
def test_fused_export_of_other_schemes_and_deepseek_v2(tmp_path, arch, scheme, overrides):
    loaded = load_checkpoint(make_tiny_checkpoint(arch, tmp_path / "checkpoint", **overrides))
    quantize_(loaded.model, RTNConfig(scheme, TargetSpec()), progress=False)
    result = export_onnx(loaded.model, loaded.tokenizer, tmp_path / "onnx", FAST)
    _fused_graph_checks(result, loaded, "ort_qmoe", scheme)
    (node,) = [n for n in onnx.load(str(result.onnx_path), load_external_data=False).graph.node if n.op_type == "QMoE"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs.get("block_size", 0) == (0 if isinstance(scheme.granularity, PerChannel) else 128)


@pytest.mark.parametrize("case, reason", [
    ("int8-g32", "no fp32 kernel for block-wise 8-bit experts"),
    ("int4-g128", "expert intermediate size 64 not a multiple of the group size 128"),
    ("swiglu-limit", "clamp their SwiGLU (swiglu_limit 7.0)"),
    ("w8a8", "W8A8Experts (int8 activations) has no MoE / QMoE form"),
    ("negative-routing", "routed_scaling_factor -1.0 makes routing weights negative"),
    ("gelu", "gated activation is GELU, not SiLU"),
    ("portable", "holds standard ONNX ops only"),
])
def test_a_layer_the_fused_op_cannot_carry_stays_sparse_and_the_manifest_says_why(tiny_checkpoint, case, reason):
    schemes = {"int8-g32": WeightScheme(8, PerGroup(32), True), "int4-g128": WeightScheme(4, PerGroup(128), True)}
    model = _model(tiny_checkpoint("deepseek_v3"), schemes.get(case))
    if case == "w8a8":
        calib = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
        quantize_(model, W8A8Config(activations=DynamicPerToken(), targets=TargetSpec()), calibration=calib, progress=False)
    elif case == "negative-routing":
        model.get_submodule("model.layers.1.mlp.gate").routed_scaling_factor = -1.0
    elif case == "gelu":
        model.get_submodule(EXPERTS).act_fn = nn.GELU()
    elif case == "swiglu-limit":  # DeepSeek-V4's clamped experts
        model.get_submodule(EXPERTS).limit = 7.0
    plan = prepare_for_export(model, moe_op=True, standard_onnx=case == "portable")
    assert isinstance(model.get_submodule(EXPERTS), SparseRoutedExperts) and not plan.fused
    entry = plan.to_dict()["routed_experts"][EXPERTS]
    assert (entry["experts"], entry["form"]) == (8, "sparse") and reason in entry["moe_op_refused"]


def test_the_installed_onnxruntime_is_probed_once_per_layout():
    assert ort_refusal(QMoELayout(4, 32, False)) is None
    assert ort_refusal(QMoELayout(8, 0, True)) is None
    # block-wise int8 runs with int8 activations: the probe sees that it is not the weight-only result
    assert "does not reproduce the experts' weights" in ort_refusal(QMoELayout(8, 32, True))
    assert "refused the node" in ort_refusal(QMoELayout(4, 24, True))  # ORT rejects the attribute itself
    hits = ort_refusal.cache_info().hits
    ort_refusal(QMoELayout(4, 32, False))
    assert ort_refusal.cache_info().hits == hits + 1  # cached: no second session


def test_export_config_wiring_dense_wins_and_the_portable_format_stays_standard(tiny_checkpoint):
    model = _model(tiny_checkpoint("deepseek_v3"), WeightScheme(4, PerGroup(32), True))
    forms = {}
    for name, config in (("default", FAST), ("off", replace(FAST, moe_op=False)),
                         ("dense", replace(FAST, dense_experts=True)), ("portable", replace(FAST, weights=DequantizeLinearWeights()))):
        _, export_model, plan = _export_copies(model, config)  # what export_onnx traces, without tracing it
        forms[name] = (type(export_model.get_submodule(EXPERTS)), plan.to_dict()["routed_experts"][EXPERTS])
    assert forms["default"] == (FusedRoutedExperts, {"experts": 8, "form": "ort_qmoe"})
    assert forms["off"] == (SparseRoutedExperts, {"experts": 8, "form": "sparse"})
    assert forms["dense"] == (DenseRoutedExperts, {"experts": 8, "form": "dense"})
    assert forms["portable"][0] is SparseRoutedExperts and "standard ONNX ops only" in forms["portable"][1]["moe_op_refused"]


def test_recipe_key_and_cli_flag_round_trip(tmp_path, capsys):
    assert load_recipe(None, ["export={}"]).export.moe_op is True
    assert export_config(load_recipe(None, ["export={}"]).export).moe_op is True
    off = load_recipe(None, ["export={moe_op: false}"])
    assert off.export.moe_op is False and export_config(off.export).moe_op is False
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("export:\n  moe_op: false\n")
    assert main(["recipe", str(recipe)]) == 0
    printed = capsys.readouterr().out
    assert "moe_op: false" in printed
    (tmp_path / "again.yaml").write_text(printed)
    assert load_recipe(tmp_path / "again.yaml").export.moe_op is False
    with pytest.raises(RecipeError, match="export.moe_op"):
        load_recipe(None, ["export={moe_op: maybe}"])
    recipe.write_text("export:\n  moe_op: 1\n")  # strict: an int is not a bool
    assert main(["recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "export.moe_op" in err and str(recipe) in err
