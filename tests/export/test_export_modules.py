"""Export forms of dsq's quantized modules: the same numbers as dsq's torch forward, op for op in ORT."""
from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from dsq.core.errors import ExportError
from dsq.export import ops
from dsq.export.modules import Int8Linear, NBitsLinear, nbits_layout
from dsq.quantize.modules import QuantLinear
from dsq.quantize.primitives import quantize_rtn
from dsq.quantize.scheme import PerChannel, PerGroup, WeightScheme
from dsq.quantize.w8a8 import DynamicPerToken, StaticPerTensor, W8A8Linear

SCHEMES = [
    WeightScheme(4, PerGroup(32), True),
    WeightScheme(4, PerGroup(64), False),  # asymmetric: zero points
    WeightScheme(8, PerChannel(), True),  # per-channel: one block of 2**ceil(log2 K)
    WeightScheme(4, PerChannel(), False),
    WeightScheme(8, PerGroup(128), False),
]


def _quant_linear(scheme: WeightScheme, in_f: int = 200, out_f: int = 48, bias: bool = True) -> QuantLinear:
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, bias=bias)
    return QuantLinear.from_linear(linear, quantize_rtn(linear.weight.detach(), scheme))


def _run_in_ort(module: nn.Module, x: torch.Tensor, path) -> np.ndarray:
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (x,), None, dynamo=True, opset_version=21, dynamic_shapes=(dims,),
                                    custom_translation_table=ops.translation_table(), verbose=False)
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.randn(3, 7, x.shape[-1]) * 2  # another shape than the traced one
    return session, other


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_nbits_linear_equals_quant_linear_in_torch(scheme):
    # in_features 200: ragged last group for group 64/128 and a padded per-channel block (256)
    q = _quant_linear(scheme)
    e = NBitsLinear(q.weight_q, q.bias, "layer", accuracy_level=0)
    if isinstance(scheme.granularity, PerGroup):
        assert e.layout.blocks == q.weight_q.scale.shape[-1]
    else:  # 200 = 8 x 25: blocks of 8 are too small, so one padded block of 256
        assert (e.layout.block_size, e.layout.blocks) == (256, 1)
    x = torch.randn(2, 5, 200)
    torch.testing.assert_close(e(x), q(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES[:3], ids=lambda s: s.describe())
def test_matmul_nbits_in_onnxruntime_matches_quant_linear(scheme, tmp_path):
    q = _quant_linear(scheme)
    e = NBitsLinear(q.weight_q, q.bias, "layer", accuracy_level=0)
    session, x = _run_in_ort(e, torch.randn(2, 5, 200), tmp_path / "m.onnx")
    ops_in_graph = {n.op_type for n in __import__("onnx").load(str(tmp_path / "m.onnx")).graph.node}
    assert "MatMulNBits" in ops_in_graph and "MatMul" not in ops_in_graph
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, q(x).detach().numpy(), atol=1e-5, rtol=1e-5)


def test_per_channel_uses_the_largest_dividing_block_without_padding():
    q = _quant_linear(WeightScheme(8, PerChannel(), True), in_f=1408)  # 1408 = 128 x 11
    e = NBitsLinear(q.weight_q, q.bias, "layer", accuracy_level=0)
    assert (e.layout.block_size, e.layout.blocks) == (128, 11) and e.b.numel() == 48 * 1408
    x = torch.randn(3, 1408)
    torch.testing.assert_close(e(x), q(x), atol=1e-5, rtol=1e-5)


def test_group_size_matmul_nbits_cannot_express_names_the_layer():
    with pytest.raises(ExportError, match="model.layers.0.mlp.up_proj: group size 48"):
        nbits_layout(WeightScheme(4, PerGroup(48), True), 64, 256, "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("act", [DynamicPerToken(), StaticPerTensor()], ids=["dynamic", "static"])
def test_int8_linear_in_onnxruntime_is_bit_exact(act, tmp_path):
    torch.manual_seed(1)
    linear = nn.Linear(96, 40)
    w = W8A8Linear.from_linear(linear, act, torch.tensor(2.5) if isinstance(act, StaticPerTensor) else None)
    e = Int8Linear(w.weight_q.packed, w.weight_q.scale, w.input_scale, w.bias)
    session, x = _run_in_ort(e, torch.randn(2, 5, 96), tmp_path / "m.onnx")
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    # integer matmul and the same rounding: identical bits, not merely close
    np.testing.assert_array_equal(got, w(x).detach().numpy())


def test_greedy_mismatch_passes_only_at_a_tie_within_the_tolerance():
    from dsq.export.validate import CaseResult, ValidationReport

    tie = ValidationReport(0.25, [CaseResult("prefill", 1, 9, 0.01), CaseResult("greedy", 1, 32, 0.0, False, 0.1)])
    assert tie.passed and not tie.greedy_equal
    real = ValidationReport(0.25, [CaseResult("prefill", 1, 9, 0.01), CaseResult("greedy", 1, 32, 0.0, False, 2.0)])
    assert not real.passed and "top-2 logit margin there 2" in real.failures()[0]
    assert not ValidationReport(1e-3, [CaseResult("prefill", 1, 9, 0.01)]).passed
