"""W8A8 with dynamic per-tensor asymmetric activations (``quantize.w8a8.activations: dynamic_tensor``): the integers
ONNX ``DynamicQuantizeLinear`` computes, the exact int32 product, the compressed-tensors group, the reload in
transformers, and the ONNX graphs for both CPU targets (``DynamicQuantizeLinear`` + ``MatMulIntegerToFloat`` u8 x s8 /
``MatMulInteger`` u8 x u8) checked against torch."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from dsq.core.errors import CheckpointError
from dsq.core.loading import load_checkpoint
from dsq.export.cpu_target import missing_features
from dsq.quantize.artifact_check import _parse_activations
from dsq.quantize.compressed_tensors_format import input_args
from dsq.quantize.w8a8 import (
    WEIGHT_SCHEME, DynamicPerTensor, DynamicPerToken, StaticPerTensor, W8A8Experts, W8A8Linear, quantize_activation_tensor,
)
from dsq.tools.testing import onnx_logits_gap


def _dynamic_quantize_linear_ort(x: np.ndarray) -> tuple[np.ndarray, float, int]:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in (("q", TensorProto.UINT8), ("s", TensorProto.FLOAT), ("z", TensorProto.UINT8))]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))], outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    q, s, z = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    return q, float(s), int(z)


@pytest.mark.parametrize("shift", [0.0, 2.5, -4.0])
def test_the_integers_are_onnx_dynamic_quantize_linear(shift):
    """Same uint8 values, scale and zero point as ONNX Runtime's DynamicQuantizeLinear, for ranges around zero and
    entirely on one side of it (where the zero point saturates at 0 or 255)."""
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        x = (torch.randn(17, 48, generator=g) * (0.1 + trial) + shift).numpy()
        q_ort, s_ort, z_ort = _dynamic_quantize_linear_ort(x)
        q, s, z = quantize_activation_tensor(torch.from_numpy(x))
        assert float(s) == s_ort and int(z) == z_ort
        assert torch.equal(q, torch.from_numpy(q_ort.astype(np.int16)))
        assert 0 <= int(q.min()) and int(q.max()) <= 255


def test_all_zero_and_empty_inputs_give_zero():
    q, s, z = quantize_activation_tensor(torch.zeros(3, 8))
    assert int(z) == 0 and float(s) > 0 and int(q.abs().max()) == 0
    q, s, z = quantize_activation_tensor(torch.zeros(0, 8))
    assert q.shape == (0, 8)
    lin = W8A8Linear.from_linear(nn.Linear(8, 4, bias=False), DynamicPerTensor())
    assert torch.equal(lin(torch.zeros(2, 8)), torch.zeros(2, 4))


def test_the_int8_product_is_exact():
    """``(q - zero) @ w`` in int32 through the int8 matmul (``q - 128`` fits int8; the zero point's share is a row
    sum): equal to the fp64 product of the same integers."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    layer = W8A8Linear.from_linear(lin, DynamicPerTensor())
    x = torch.randn(3, 11, 96) * 2 + 0.7
    q, s, z = quantize_activation_tensor(x.reshape(-1, 96))
    w = layer.weight_q.packed.double()
    ref = (q.double() - z.double()) @ w.t() * s.double() * layer.weight_q.scale.double().reshape(-1) + lin.bias.double()
    got = layer(x).reshape(-1, 40).double()
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (layer(x) - lin(x)).abs().max() <= 0.05 * lin(x).abs().max()  # and close to the fp layer
    assert sum(layer.matmul_calls.values()) == 2


def test_one_step_for_the_whole_tensor():
    """Per tensor, not per token: a large token widens every token's step; per token it does not."""
    torch.manual_seed(1)
    lin = nn.Linear(32, 16, bias=False)
    x = torch.randn(4, 32)
    loud = torch.cat([x, 1000 * torch.randn(1, 32)])
    for act, changes in ((DynamicPerTensor(), True), (DynamicPerToken(), False)):
        layer = W8A8Linear.from_linear(lin, act)
        moved = not torch.allclose(layer(x), layer(loud)[:4], atol=1e-6)
        assert moved is changes


def test_experts_quantize_each_experts_tokens_per_tensor(tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint("deepseek_v3"))
    experts = next(m for m in loaded.model.modules() if type(m).__name__.endswith("Experts") and hasattr(m, "gate_up_proj"))
    w8 = W8A8Experts.from_experts(experts, DynamicPerTensor())
    tokens, k = 9, 2
    hidden = torch.randn(tokens, w8.hidden_dim)
    idx = torch.stack([torch.randperm(w8.num_experts)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k)
    ref = experts(hidden, idx, weights)
    got = w8(hidden, idx, weights)
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def test_compressed_tensors_args_round_trip_and_bad_args_name_the_key(tmp_path):
    args = input_args(DynamicPerTensor()).model_dump()
    assert (args["strategy"], args["dynamic"], args["symmetric"]) == ("tensor", True, False)
    assert _parse_activations("g.input_activations", args, WEIGHT_SCHEME, tmp_path) == DynamicPerTensor()
    for act in (DynamicPerToken(), StaticPerTensor()):
        assert _parse_activations("g.input_activations", input_args(act).model_dump(), WEIGHT_SCHEME, tmp_path) == act
    bad = {**input_args(DynamicPerToken()).model_dump(), "symmetric": False}  # asymmetric per token: not read
    with pytest.raises(CheckpointError, match=r"g\.input_activations\.symmetric"):
        _parse_activations("g.input_activations", bad, WEIGHT_SCHEME, tmp_path)
    with pytest.raises(CheckpointError, match=r"g\.input_activations"):
        _parse_activations("g.input_activations", {**args, "symmetric": "no"}, WEIGHT_SCHEME, tmp_path)


@pytest.fixture(scope="module")
def per_tensor_run(tmp_path_factory):
    """The pipeline on a tiny Llama with ``quantize.w8a8.activations: dynamic_tensor``: (result, output directory)."""
    from dsq.run.recipe import load_recipe
    from dsq.run.pipeline import run
    from dsq.tools.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("w8a8_tensor")
    checkpoint = make_tiny_checkpoint("llama", root / "llama")
    recipe = load_recipe(None, [
        f"model={checkpoint}", f"output={root / 'out'}", "quantize.method=w8a8", "quantize.w8a8.activations=dynamic_tensor",
        "quantize.calibration.samples=4", "quantize.calibration.seq_len=32", "eval.multiple_choice=null",
        "eval.perplexity.max_tokens=1024", "eval.perplexity.context=128", "eval.perplexity.stride=64",
        "eval.fidelity.seq_len=64", "eval.fidelity.max_tokens=256", "progress=false",
    ])
    return run(recipe), root / "out"


def test_the_artifact_reloads_in_transformers_and_in_dsq(per_tensor_run):
    """The run's reload check passed (transformers' compressed-tensors forward of tensor/dynamic/asymmetric int8),
    and dsq reads the group back as DynamicPerTensor with the run's logits."""
    from dsq.quantize.artifact_load import load_artifact

    _, out = per_tensor_run
    row = json.loads((out / "report.json").read_text())["candidates"][0]
    assert row["name"].startswith("w8a8-dynamic_tensor")
    assert row["extra"]["reload_check"]["passed"] is True
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    acts = [g["input_activations"] for g in config["config_groups"].values()]
    assert acts and all((a["strategy"], a["dynamic"], a["symmetric"]) == ("tensor", True, False) for a in acts)
    layers = [m for m in load_artifact(out).model.modules() if isinstance(m, W8A8Linear)]
    assert layers and all(isinstance(m.act, DynamicPerTensor) for m in layers)


@pytest.fixture(scope="module")
def per_tensor_exports(tiny_checkpoint, tmp_path_factory):
    """A per-tensor W8A8 tiny Llama exported for both CPU targets: (portable result, vnni result)."""
    from dsq.export import VNNI, export_onnx
    from dsq.quantize import TargetSpec, W8A8Config, quantize_
    from dsq.tools.testing import fast_export_config

    loaded = load_checkpoint(tiny_checkpoint("llama"))
    calib = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_(loaded.model, W8A8Config(activations=DynamicPerTensor(), targets=TargetSpec()), calibration=calib, progress=False)
    root = tmp_path_factory.mktemp("tensor_export")
    fast = fast_export_config()
    portable = export_onnx(loaded.model, loaded.tokenizer, root / "portable", fast)
    vnni_validation = fast.validation if missing_features(VNNI) is None else replace(fast.validation, tolerance=1e9)
    vnni = export_onnx(loaded.model, loaded.tokenizer, root / "vnni", replace(fast, cpu_target=VNNI, validation=vnni_validation))
    return portable, vnni


def test_the_onnx_graphs_compute_the_same_integers(per_tensor_exports):
    """Portable: ``DynamicQuantizeLinear`` + u8 x u8 ``MatMulInteger`` (exact on any CPU), validated against torch
    (prefill, cached decode, greedy tokens). vnni: ``MatMulIntegerToFloat`` with the s8 weights and the activations'
    zero point; its
    agreement with torch is checked where the u8 x s8 kernel is exact (VNNI / AMX)."""
    import onnx
    from onnx import TensorProto

    from dsq.export import VNNI

    portable, vnni = per_tensor_exports
    n = len(portable.plan.int8)
    assert n > 0 and portable.validation.passed and portable.validation.greedy_equal
    assert portable.validation.max_abs_diff <= 0.25
    # at most one DynamicQuantizeLinear per weight; the exporter's common-subexpression pass (onnxscript with the
    # locked versions) merges those of q/k/v and of gate/up into one per distinct input: 4 per layer
    assert portable.ops["MatMulInteger"] == n and 1 <= portable.ops["DynamicQuantizeLinear"] <= n
    assert "Abs" not in portable.ops and "QuantizeLinear" not in portable.ops  # nothing per token (no |x| maxima)
    assert vnni.ops["com.microsoft::MatMulIntegerToFloat"] == n
    assert vnni.ops["DynamicQuantizeLinear"] == portable.ops["DynamicQuantizeLinear"]
    assert "MatMulInteger" not in vnni.ops
    graph = onnx.load(str(vnni.path / "model.onnx"), load_external_data=False).graph
    types = {t.name: t.data_type for t in graph.initializer}
    produced_by = {out: node.op_type for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type == "MatMulIntegerToFloat":
            assert types[node.input[1]] == TensorProto.INT8  # s8 weights: the u8 x s8 kernel
            assert produced_by[node.input[0]] == produced_by[node.input[4]] == "DynamicQuantizeLinear"  # its zero point
    manifest = json.loads((vnni.path / "export_manifest.json").read_text())
    assert set(manifest["quantized_modules"]["int8_matmul"].values()) == {DynamicPerTensor().describe()}
    if missing_features(VNNI) is None:
        assert vnni.validation.passed and vnni.validation.greedy_equal
        assert onnx_logits_gap(portable.path, vnni.path) <= 2e-3


def test_a_mutated_zero_point_fails_the_export_check(tiny_checkpoint, tmp_path, monkeypatch):
    """The validation sees the zero point: a reference that forgets it no longer matches ONNX Runtime."""
    import dsq.quantize.w8a8 as w8a8
    from dsq.core.errors import ExportError
    from dsq.export import export_onnx
    from dsq.quantize import TargetSpec, W8A8Config, quantize_
    from dsq.tools.testing import fast_export_config

    loaded = load_checkpoint(tiny_checkpoint("llama"))
    quantize_(loaded.model, W8A8Config(activations=DynamicPerTensor(), smoothquant_alpha=None, targets=TargetSpec()), progress=False)
    real = w8a8.quantize_activation_tensor
    monkeypatch.setattr(w8a8, "quantize_activation_tensor", lambda x: (lambda q, s, z: (q, s, z * 0))(*real(x)))
    with pytest.raises(ExportError):
        export_onnx(loaded.model, loaded.tokenizer, tmp_path / "out", fast_export_config())
    assert not (tmp_path / "out").exists()


def test_the_recipe_names_the_scheme_and_refuses_others(tmp_path):
    from dsq.core.errors import RecipeError
    from dsq.quantize.methods.w8a8 import ACTIVATION_SCHEMES
    from dsq.run.recipe import load_recipe

    recipe = load_recipe(None, ["quantize.method=w8a8", "quantize.w8a8.activations=dynamic_tensor"])
    assert recipe.quantize.config().activations == DynamicPerTensor()
    assert set(ACTIVATION_SCHEMES) == {"dynamic", "dynamic_tensor", "static"}
    with pytest.raises(RecipeError, match=r"quantize\.w8a8\.activations"):
        load_recipe(None, ["quantize.method=w8a8", "quantize.w8a8.activations=per_tensor"])


def test_deepseek_experts_export_sparse_and_refuse_the_dense_form(tiny_checkpoint, tmp_path):
    """Routed experts quantize the tokens routed to each expert as one tensor: the sparse graph gives each expert
    exactly those rows (validated against torch, MLA included); the dense form would not, so it is refused by name
    and nothing is written."""
    from dsq.core.errors import ExportError
    from dsq.export import export_onnx
    from dsq.quantize import TargetSpec, W8A8Config, quantize_
    from dsq.tools.testing import fast_export_config

    loaded = load_checkpoint(tiny_checkpoint("deepseek_v3"))
    quantize_(loaded.model, W8A8Config(activations=DynamicPerTensor(), smoothquant_alpha=None, targets=TargetSpec()), progress=False)
    result = export_onnx(loaded.model, loaded.tokenizer, tmp_path / "sparse", fast_export_config())
    assert result.validation.passed and result.validation.greedy_equal and result.plan.experts
    assert result.plan.expert_form == "sparse"
    with pytest.raises(ExportError, match=r"experts: per-tensor activations.*dense_experts: false"):
        export_onnx(loaded.model, loaded.tokenizer, tmp_path / "dense", replace(fast_export_config(), dense_experts=True))
    assert not (tmp_path / "dense").exists()
