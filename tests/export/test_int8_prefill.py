"""Weight-only graphs whose prompts run on the int8 GEMM (``ExportConfig(int8_prefill=True)``)."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dsq.cli import main
from dsq.core.errors import ExportError
from dsq.core.loading import load_checkpoint
from dsq.export import DequantizeLinearWeights, ExportConfig, OrtCausalLM, cpu_target, export_onnx
from dsq.export.int8_prefill import add_int8_prefill, nbits_weight, requantize_int8
from dsq.quantize import PerGroup, RTNConfig, TargetSpec, WeightScheme, quantize_
from dsq.quantize.w8a8 import DynamicPerTensor, DynamicPerToken
from dsq.tools.testing import fast_export_config

VNNI = cpu_target("vnni")
FAST = replace(fast_export_config(), cpu_target=VNNI)
K, N, BLOCK = 96, 40, 32  # 3 blocks per row


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _nbits_model(bits: int, zero_points: bool, seed: int = 0) -> onnx.ModelProto:
    """One ``MatMulNBits`` [B, S, K] x [K, N] with random packed integers, scales (and zero points)."""
    rng = np.random.default_rng(seed)
    blocks = K // BLOCK
    b = rng.integers(0, 256, size=(N, blocks, BLOCK * bits // 8), dtype=np.uint8)
    scales = (rng.random(N * blocks, dtype=np.float32) + 0.5) * 0.02
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S")]
    inputs = ["x", "B", "S"]
    if zero_points:
        zp = rng.integers(0, 256, size=(N, (blocks * bits + 7) // 8), dtype=np.uint8)
        inits.append(numpy_helper.from_array(zp.reshape(-1), "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", name="mm", K=K, N=N, bits=bits,
                            block_size=BLOCK, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _per_tensor(x: np.ndarray, w8: np.ndarray, s8: np.ndarray) -> np.ndarray:
    """ONNX Runtime's DynamicQuantizeMatMul: x to uint8 with one asymmetric scale per tensor, times s8 weights."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = np.float32((hi - lo) / 255)
    zero = np.clip(np.round(-lo / scale), 0, 255)
    xq = np.clip(np.round(x / scale) + zero, 0, 255)
    acc = (xq - zero).astype(np.int64) @ w8.astype(np.int64)  # exact int32 accumulators
    return (acc * (scale * s8)).astype(np.float32)


def _per_token(x: np.ndarray, w8: np.ndarray, s8: np.ndarray) -> np.ndarray:
    """dsq's per-token W8A8: scale max|x| / 127 per token, round half to even, int32 accumulators, rescale."""
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / np.float32(127), np.finfo(np.float32).tiny)
    q = np.clip(np.round(x / scale), -128, 127)
    acc = q.astype(np.int64) @ w8.astype(np.int64)
    return ((acc * s8).astype(np.float32) * scale).astype(np.float32)


REFERENCE = {DynamicPerToken(): _per_token, DynamicPerTensor(): _per_tensor}


def test_requantize_keeps_every_weight_within_half_an_int8_step():
    w = np.random.default_rng(0).standard_normal((7, 50)).astype(np.float32)
    w[3] = 0.0  # an all-zero channel keeps a usable scale
    w8, s8 = requantize_int8(w)
    assert w8.dtype == np.int8 and w8.shape == (50, 7) and s8.shape == (7,)
    assert np.abs(w8).max() <= 127 and np.all(np.abs(w8).max(axis=0)[[0, 1, 2, 4, 5, 6]] == 127)
    err = np.abs(w8.T * s8[:, None] - w)
    assert np.all(err <= s8[:, None] / 2 + 1e-7)
    assert s8[3] > 0 and not w8[:, 3].any()


@pytest.mark.parametrize("bits,zero_points", [(4, False), (4, True), (8, False)])
def test_nbits_weight_is_what_matmul_nbits_multiplies_by(bits, zero_points):
    model = _nbits_model(bits, zero_points)
    w = nbits_weight(model.graph.node[0], {t.name: t for t in model.graph.initializer})
    assert w.shape == (N, K)
    x = np.random.default_rng(1).standard_normal((2, 5, K)).astype(np.float32)
    (y,) = _session(model).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activations", [DynamicPerToken(), DynamicPerTensor()])
@pytest.mark.parametrize("bits,zero_points", [(4, False), (4, True)])
def test_prompts_take_the_int8_kernel_and_single_tokens_matmul_nbits(bits, zero_points, activations):
    plain = _nbits_model(bits, zero_points)
    switched = _nbits_model(bits, zero_points)
    added = add_int8_prefill(switched, activations, input_ids="x")
    assert added.layers == 1 and added.int8_bytes == K * N + 4 * N and added.activations == activations
    assert [n.op_type for n in switched.graph.node] == ["Shape", "Greater", "If"]
    w = nbits_weight(plain.graph.node[0], {t.name: t for t in plain.graph.initializer})
    w8, s8 = requantize_int8(w)
    a, b = _session(plain), _session(switched)
    rng = np.random.default_rng(2)
    step = rng.standard_normal((3, 1, K)).astype(np.float32)
    np.testing.assert_array_equal(b.run(None, {"x": step})[0], a.run(None, {"x": step})[0])  # MatMulNBits itself
    prompt = rng.standard_normal((2, 6, K)).astype(np.float32)
    got = b.run(None, {"x": prompt})[0]
    np.testing.assert_allclose(got, REFERENCE[activations](prompt, w8, s8), rtol=1e-5, atol=1e-5)
    exact = a.run(None, {"x": prompt})[0]
    assert 0 < np.abs(got - exact).max() < 0.05 * np.abs(exact).max()  # int8 rounding, not another product


def test_a_graph_without_weight_only_layers_is_refused():
    model = _nbits_model(4, False)
    model.graph.node[0].op_type = "MatMulNBits2"
    with pytest.raises(ValueError, match="no MatMulNBits layer"):
        add_int8_prefill(model, input_ids="x")
    with pytest.raises(TypeError, match="DynamicPerToken"):
        add_int8_prefill(_nbits_model(4, False), "dynamic", input_ids="x")


def test_config_needs_the_vnni_target_and_matmul_nbits():
    with pytest.raises(ValueError, match="cpu_target vnni"):
        ExportConfig(int8_prefill=DynamicPerToken())
    with pytest.raises(ValueError, match="DequantizeLinear"):
        ExportConfig(int8_prefill=DynamicPerToken(), cpu_target=VNNI, weights=DequantizeLinearWeights())
    with pytest.raises(TypeError, match="int8_prefill"):
        ExportConfig(int8_prefill=True, cpu_target=VNNI)


@pytest.fixture(scope="module")
def llama_int4(tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint("llama"))
    quantize_(loaded.model, RTNConfig(WeightScheme(4, PerGroup(32), False), TargetSpec()), progress=False)
    return loaded


@pytest.mark.parametrize("activations", [DynamicPerToken(), DynamicPerTensor()])
def test_int4_llama_export_switches_per_run_and_matches_torch(llama_int4, tmp_path, activations):
    plain = export_onnx(llama_int4.model, llama_int4.tokenizer, tmp_path / "plain", FAST)
    result = export_onnx(llama_int4.model, llama_int4.tokenizer, tmp_path / "i8p", replace(FAST, int8_prefill=activations))
    v = result.validation
    assert v.passed and v.tolerance == 0.25  # greedy tokens may differ only where torch's top two logits tie
    assert {c.kind for c in v.cases} == {"prefill", "decode", "greedy"}
    layers = len(result.plan.nbits)
    assert result.int8_prefill.layers == layers == plain.ops["com.microsoft::MatMulNBits"]
    assert result.ops == plain.ops  # the manifest's ops: the traced graph, i.e. the single-token branch
    graph = onnx.load(str(result.onnx_path), load_external_data=False).graph
    (switch,) = [n for n in graph.node if n.op_type == "If"]
    branches = {a.name: [n.op_type for n in a.g.node] for a in switch.attribute}
    kernel = "MatMulIntegerToFloat" if activations == DynamicPerToken() else "DynamicQuantizeMatMul"
    assert branches["then_branch"].count(kernel) == layers and "MatMulNBits" not in branches["then_branch"]
    assert branches["else_branch"].count("MatMulNBits") == layers and kernel not in branches["else_branch"]
    if activations == DynamicPerToken():  # one quantization per distinct input: q/k/v share one, gate/up share one
        per_layer = {"q_proj": 1, "o_proj": 1, "gate_proj": 1, "down_proj": 1}
        assert branches["then_branch"].count("QuantizeLinear") == sum(per_layer.values()) * llama_int4.model.config.num_hidden_layers
    manifest = json.loads((result.path / "export_manifest.json").read_text())
    assert manifest["int8_prefill"]["layers"] == layers and manifest["cpu_target"]["name"] == "vnni"
    assert manifest["int8_prefill"]["activations"] == activations.describe()
    # the file holds the int8 copy beside the 4-bit integers
    assert result.onnx_bytes - plain.onnx_bytes >= result.int8_prefill.int8_bytes
    # single-token steps are the plain graph's, bit for bit; prompts are not
    a, b = OrtCausalLM(plain.path), OrtCausalLM(result.path)
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, 500, size=(2, 9)))
    pa, pb = a.prefill(ids), b.prefill(ids)
    assert 0 < (pa - pb).abs().max() < 0.25
    past = a.empty_past(2)
    mask = torch.ones(2, 1, dtype=torch.long)
    la, _ = a.step(ids[:, :1], mask, past)
    lb, _ = b.step(ids[:, :1], mask, past)
    assert torch.equal(la, lb)


def test_deepseek_v3_switches_its_linear_layers_and_keeps_the_fused_experts(tiny_checkpoint, tmp_path):
    loaded = load_checkpoint(tiny_checkpoint("deepseek_v3"))
    quantize_(loaded.model, RTNConfig(WeightScheme(4, PerGroup(32), True), TargetSpec()), progress=False)
    plain = export_onnx(loaded.model, loaded.tokenizer, tmp_path / "plain", FAST)
    result = export_onnx(loaded.model, loaded.tokenizer, tmp_path / "i8p", replace(FAST, int8_prefill=DynamicPerToken()))
    assert result.validation.passed
    assert result.int8_prefill.layers == plain.ops["com.microsoft::MatMulNBits"] > 0  # MLA, shared experts, dense MLP
    graph = onnx.load(str(result.onnx_path), load_external_data=False).graph
    (switch,) = [n for n in graph.node if n.op_type == "If"]
    for branch in switch.attribute:  # routed experts stay one QMoE node per layer in both branches
        assert [n.op_type for n in branch.g.node].count("QMoE") == plain.ops["com.microsoft::QMoE"] > 0
    a, b = OrtCausalLM(plain.path), OrtCausalLM(result.path)
    ids = torch.tensor([[5, 17, 42]])
    la, _ = a.step(ids[:, :1], torch.ones(1, 1, dtype=torch.long), a.empty_past(1))
    lb, _ = b.step(ids[:, :1], torch.ones(1, 1, dtype=torch.long), b.empty_past(1))
    assert torch.equal(la, lb)


def test_int8_prefill_without_weight_only_layers_fails_and_leaves_nothing(tiny_checkpoint, tmp_path):
    loaded = load_checkpoint(tiny_checkpoint("llama"))
    out = tmp_path / "fp"
    with pytest.raises(ExportError, match="no MatMulNBits layer"):
        export_onnx(loaded.model, loaded.tokenizer, out, replace(FAST, int8_prefill=DynamicPerToken()))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_refuses_int8_prefill_without_the_vnni_target(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "x"
    code = main(["export", str(tiny_checkpoint("llama")), "-o", str(out), "--int8-prefill", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "cpu_target: vnni" in err and "Traceback" not in err
    assert not out.exists()


def test_a_missed_tolerance_names_the_int8_prompts_as_the_cause():
    from dsq.export.modules import ExportPlan
    from dsq.export.onnx_export import _rounding_hint
    from dsq.export.validate import CaseResult, ValidationReport

    report = ValidationReport(0.25, [CaseResult("prefill", 1, 64, 1.7), CaseResult("greedy", 1, 32, 0.0, tokens_equal=True)])
    weight_only = ExportPlan(nbits={"model.layers.0.mlp.up_proj": "int4 g128"})
    hint = _rounding_hint(weight_only, replace(FAST, int8_prefill=DynamicPerToken()), report)
    assert "int8_prefill, for prompts" in hint and "export.validation.tolerance" in hint
    assert "accuracy level 4" in _rounding_hint(weight_only, replace(FAST, accuracy_level=4), report)
    assert _rounding_hint(weight_only, FAST, report) == ""  # fp32 activations: no int8 to blame


def test_recipe_section_maps_to_the_activation_types():
    from dsq.run.export_step import export_config
    from dsq.run.recipe import ExportSection

    assert export_config(ExportSection(cpu_target="vnni", int8_prefill="dynamic")).int8_prefill == DynamicPerToken()
    assert export_config(ExportSection(cpu_target="vnni", int8_prefill="dynamic_tensor")).int8_prefill == DynamicPerTensor()
    assert export_config(ExportSection()).int8_prefill is None
    with pytest.raises(ValueError, match="weight_op: matmul_nbits"):
        ExportSection(cpu_target="vnni", int8_prefill="dynamic", weight_op="dequantize_linear")


def test_cli_refuses_int8_prefill_on_a_model_without_weight_only_layers(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "x"
    code = main(["export", str(tiny_checkpoint("llama")), "-o", str(out), "--cpu-target", "vnni", "--int8-prefill", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "no MatMulNBits layer" in err and "Traceback" not in err
    assert not out.exists()
