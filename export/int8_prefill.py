"""Weight-only graphs whose prompts run on the int8 GEMM: one ``If`` on the number of new tokens.

ONNX Runtime's ``MatMulNBits`` kernel reads 4-bit weights, which makes single-token steps fast (they are
bound by memory traffic), but on a CPU whose int8 GEMM is much faster than its fp32 one (AMX-INT8) its
prompt-sized products run at about fp32 speed (``benchmarks/onnx_speed.py --kernels``). With
``ExportConfig(int8_prefill=DynamicPerToken())`` the graph carries each ``MatMulNBits`` layer twice and picks per
run:

    is_prompt = Shape(input_ids)[1] > 1
    If(is_prompt)  then: the decoder with each MatMulNBits(x, B, scales[, zeros]) replaced by an int8 matmul
                         of x's uint8 activations and the s8 weights W8 (u8 x s8), rescaled by s8
                   else: the decoder as exported (MatMulNBits)

``W8`` / ``s8`` are the layer's own n-bit values, rounded once more to int8 with one symmetric scale per
output channel (the 4-bit grid of a channel does not fit one int8 scale exactly):

    W[n, k] = (q[n, k] - zero[n, k // block]) * scale[n, k // block]      (what MatMulNBits computes with)
    s8[n]   = max_k |W[n, k]| / 127
    W8[k, n] = clip(round(W[n, k] / s8[n]), -127, 127)                   so |W8 * s8 - W| <= s8 / 2

Prompt activations are rounded at run time like W8A8's (:mod:`dsq.quantize.w8a8`), by the export's choice:

* :class:`~dsq.quantize.w8a8.DynamicPerToken` (default): one symmetric scale per token, ``max|x| / 127``;
  ``QuantizeLinear`` (uint8, zero point 128) + ``com.microsoft::MatMulIntegerToFloat``, the token's scale applied to
  the output (dsq's vnni W8A8 form); one quantization per distinct input (q/k/v share one, gate/up share one).
* :class:`~dsq.quantize.w8a8.DynamicPerTensor`: one asymmetric uint8 scale and zero point per input tensor,
  ``com.microsoft::DynamicQuantizeMatMul`` (ONNX Runtime's fused kernel; faster, and a prompt's outlier tokens
  widen every token's step).

Prompt numerics are therefore the weights within half an int8 step per channel times the rounded activations;
the export validates prompts and single-token steps against torch at the int8-activation tolerance, like W8A8.

``W8`` is stored in the file beside the n-bit integers. Deriving it in the graph from the n-bit initializers would
let ONNX Runtime fold it when the session starts, but its constant folding keeps every fp32 intermediate of the
derivation until the end of the pass. The file and the session hold both forms: about 1.5 bytes per weight for
4-bit layers (fp32: 4), 1 byte more than the weight-only graph.

The u8 x s8 kernel is exact only with VNNI or AMX (:mod:`dsq.export.cpu_target`), so the option needs
``cpu_target`` ``vnni``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from dsq.quantize.primitives import quantize_rtn
from dsq.quantize.scheme import PerChannel, WeightScheme
from dsq.quantize.w8a8 import DynamicPerTensor, DynamicPerToken

from .portable import _attrs, _unpack_blocks, _zero_points

PromptActivations = DynamicPerToken | DynamicPerTensor

PROMPT = "prompt"
STEP = "step"
INT8_MAX = 127
INT8_PER_CHANNEL = WeightScheme(8, PerChannel(), True)  # the prompt copy's scheme: int8, symmetric, per output channel
WEIGHT_SUFFIX, SCALE_SUFFIX = ".int8.w", ".int8.scale"  # initializer names: <MatMulNBits node name><suffix>
PREFIX = "int8_prefill."  # names of the switch and the shared constants


@dataclass(frozen=True)
class Int8Prefill:
    """What :func:`add_int8_prefill` wrote.

    Attributes:
        layers: ``MatMulNBits`` layers given an int8 prompt form.
        int8_bytes: bytes of the added int8 weights and their scales.
        activations: how prompt activations are rounded.
    """

    layers: int
    int8_bytes: int
    activations: PromptActivations

    def to_dict(self) -> dict:
        kernel = ("QuantizeLinear per token + MatMulIntegerToFloat" if isinstance(self.activations, DynamicPerToken)
                  else "DynamicQuantizeMatMul")
        return {"layers": self.layers, "int8_bytes": self.int8_bytes, "activations": self.activations.describe(),
                "prompt": f"{kernel}: u8 activations x s8 weights, one weight scale per output channel",
                "single_token": "MatMulNBits", "switch": "If(Shape(input_ids)[1] > 1)"}


def requantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(W8 [K, N] int8, s8 [N] fp32)`` for ``w`` ``[N, K]``: dsq's round-to-nearest int8, one symmetric scale
    (``max|w| / 127``) per output channel."""
    qw = quantize_rtn(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)), INT8_PER_CHANNEL)
    return np.ascontiguousarray(qw.qweight.numpy().T), qw.scale[:, 0].numpy()


def nbits_weight(node: onnx.NodeProto, inits: dict[str, TensorProto]) -> np.ndarray:
    """The fp32 weight ``[N, K]`` a ``MatMulNBits`` node multiplies by: ``(q - zero) * scale`` per block."""
    a = _attrs(node)
    k, n, bits, block = a["K"], a["N"], a["bits"], a["block_size"]
    if len(node.input) > 4 and node.input[4]:
        raise ValueError(f"{node.name}: MatMulNBits with g_idx has no int8 prefill form")
    b = numpy_helper.to_array(inits[node.input[1]])
    blocks = b.shape[1]
    scale = numpy_helper.to_array(inits[node.input[2]]).reshape(n, blocks).astype(np.float32)
    q = _unpack_blocks(b, bits, k).astype(np.float32)  # (N, K)
    zero = _zero_points(list(node.input), inits, n, blocks, bits).astype(np.float32)  # (N, blocks)
    per_k = np.arange(k) // block
    return (q - zero[:, per_k]) * scale[:, per_k]


def _tensor_node(node: onnx.NodeProto, w8: str, s8: str) -> list[onnx.NodeProto]:
    """Per-tensor activations: ``DynamicQuantizeMatMul(x, W8, s8[, bias])`` (quantization fused into the kernel)."""
    inputs = [node.input[0], w8, s8]
    if len(node.input) > 5 and node.input[5]:  # bias
        inputs += ["", node.input[5]]
    return [helper.make_node("DynamicQuantizeMatMul", inputs, list(node.output), domain="com.microsoft",
                             name=f"{node.name}.int8")]


def _token_quantization(x: str) -> tuple[list[onnx.NodeProto], tuple[str, str, str]]:
    """Per-token activations of ``x`` ``[..., K]``: ``(nodes, (q [T, K] uint8, scale [..., 1], x's leading shape))``, with
    ``scale = max(max|x| / 127, tiny)`` and ``q = saturate(round_half_even(x / scale) + 128)``: the nodes
    :mod:`dsq.export.ops` traces for W8A8's ``dsq::matmul_int8_token_s8``, written here on a saved graph."""
    p = f"{x}.int8_token"
    c = f"{PREFIX}const"

    def node(op: str, inputs: list[str], out: str, **attrs) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [out], name=out, **attrs)

    nodes = [
        node("Abs", [x], f"{p}/abs"),
        node("ReduceMax", [f"{p}/abs", f"{c}.minus_one"], f"{p}/amax", keepdims=1),
        node("Div", [f"{p}/amax", f"{c}.int8_max"], f"{p}/scale0"),
        node("Max", [f"{p}/scale0", f"{c}.tiny"], f"{p}/scale"),  # [..., 1]
        node("Reshape", [f"{p}/scale", f"{c}.minus_one"], f"{p}/flat_scale"),  # [T]
        node("Shape", [x], f"{p}/k", start=-1),
        node("Concat", [f"{c}.minus_one", f"{p}/k"], f"{p}/tk", axis=0),
        node("Reshape", [x, f"{p}/tk"], f"{p}/flat"),  # [T, K]
        node("Shape", [f"{p}/flat_scale"], f"{p}/t"),
        node("Expand", [f"{c}.u8_zero", f"{p}/t"], f"{p}/zero"),  # [T] uint8 128
        node("QuantizeLinear", [f"{p}/flat", f"{p}/flat_scale", f"{p}/zero"], f"{p}/q", axis=0),  # [T, K] uint8
        node("Shape", [x], f"{p}/lead", end=-1),
    ]
    return nodes, (f"{p}/q", f"{p}/scale", f"{p}/lead")


def _token_node(node: onnx.NodeProto, w8: str, s8: str, q: str, scale: str, lead: str, n: int) -> list[onnx.NodeProto]:
    """Per-token activations: ``MatMulIntegerToFloat(q, W8, 1, s8, 128)`` ``[T, N]``, back to ``[..., N]``, times the
    token's scale (applied after the reshape: measured faster on the flat output's copy)."""
    p, c = f"{node.name}.int8", f"{PREFIX}const"
    out = node.output[0]
    has_bias = len(node.input) > 5 and bool(node.input[5])
    nodes = [
        helper.make_node("MatMulIntegerToFloat", [q, w8, f"{c}.one", s8, f"{c}.u8_zero"], [f"{p}/flat_y"],
                         domain="com.microsoft", name=f"{p}/mm"),
        helper.make_node("Concat", [lead, f"{c}.n{n}"], [f"{p}/shape"], axis=0, name=f"{p}/shape"),
        helper.make_node("Reshape", [f"{p}/flat_y", f"{p}/shape"], [f"{p}/y"], name=f"{p}/reshape"),
        helper.make_node("Mul", [f"{p}/y", scale], [f"{p}/scaled" if has_bias else out], name=f"{p}/rescale"),
    ]
    if has_bias:
        nodes.append(helper.make_node("Add", [f"{p}/scaled", node.input[5]], [out], name=f"{p}/bias"))
    return nodes


def _constants(ns: set[int]) -> list[TensorProto]:
    c = f"{PREFIX}const"
    values = {".minus_one": np.array([-1], np.int64), ".int8_max": np.array(INT8_MAX, np.float32),
              ".tiny": np.array(np.finfo(np.float32).tiny, np.float32),
              ".u8_zero": np.array(128, np.uint8), ".one": np.array(1.0, np.float32),
              **{f".n{n}": np.array([n], np.int64) for n in sorted(ns)}}
    return [numpy_helper.from_array(v, c + k) for k, v in values.items()]


def _branch(nodes: list[onnx.NodeProto], tag: str, graph: onnx.GraphProto) -> onnx.GraphProto:
    """A subgraph of ``nodes`` (copies) whose every node output is renamed ``<tag>/<name>``; its outputs are
    the graph's outputs under the new names, its value infos the graph's, renamed."""
    nodes = [copy.deepcopy(n) for n in nodes]
    renamed: dict[str, str] = {}
    for n in nodes:
        for i, out in enumerate(n.output):
            if out:
                renamed[out] = n.output[i] = f"{tag}/{out}"
        n.name = f"{tag}/{n.name}"
    for n in nodes:
        for i, name in enumerate(n.input):
            n.input[i] = renamed.get(name, name)
    outputs = []
    for o in graph.output:
        vi = copy.deepcopy(o)
        vi.name = renamed[o.name]
        outputs.append(vi)
    infos = []
    for v in graph.value_info:
        if v.name in renamed:
            vi = copy.deepcopy(v)
            vi.name = renamed[v.name]
            infos.append(vi)
    return helper.make_graph(nodes, tag, [], outputs, value_info=infos)


def add_int8_prefill(model: onnx.ModelProto, activations: PromptActivations = DynamicPerToken(),
                     input_ids: str = "input_ids") -> Int8Prefill:
    """Give every ``MatMulNBits`` layer of ``model`` (in place) an int8 form used for prompts (see module doc).

    Raises:
        ValueError: the graph has no ``MatMulNBits`` layer, a layer has ``g_idx``, or the names it adds exist.
    """
    if not isinstance(activations, (DynamicPerToken, DynamicPerTensor)):
        raise TypeError(f"prompt activations must be DynamicPerToken() or DynamicPerTensor(), got {activations!r}")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)
    prompt_nodes, added, nbytes, quantized, widths = [], [], 0, {}, set()
    for node in nodes:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            prompt_nodes.append(node)
            continue
        w8, s8 = requantize_int8(nbits_weight(node, inits))
        names = (node.name + WEIGHT_SUFFIX, node.name + SCALE_SUFFIX)
        if any(name in inits for name in names):
            raise ValueError(f"{node.name}: the graph already has {names[0]}")
        added += [numpy_helper.from_array(w8, names[0]), numpy_helper.from_array(s8, names[1])]
        nbytes += w8.nbytes + s8.nbytes
        if isinstance(activations, DynamicPerTensor):
            prompt_nodes += _tensor_node(node, *names)
            continue
        x = node.input[0]
        if x not in quantized:  # one quantization per distinct input (q/k/v, gate/up)
            quantize, quantized[x] = _token_quantization(x)
            prompt_nodes += quantize
        widths.add(w8.shape[1])
        prompt_nodes += _token_node(node, *names, *quantized[x], w8.shape[1])
    layers = len(added) // 2
    if not layers:
        raise ValueError("the graph has no MatMulNBits layer: int8_prefill has nothing to do")
    one = f"{PREFIX}one"
    switch = [
        helper.make_node("Shape", [input_ids], [f"{PREFIX}new_tokens"], start=1, end=2, name=f"{PREFIX}shape"),
        helper.make_node("Greater", [f"{PREFIX}new_tokens", one], [f"{PREFIX}is_prompt"], name=f"{PREFIX}greater"),
        helper.make_node("If", [f"{PREFIX}is_prompt"], [o.name for o in graph.output], name=f"{PREFIX}if",
                         then_branch=_branch(prompt_nodes, PROMPT, graph), else_branch=_branch(nodes, STEP, graph)),
    ]
    del graph.node[:]
    graph.node.extend(switch)
    del graph.value_info[:]
    graph.initializer.extend([*added, numpy_helper.from_array(np.array(1, dtype=np.int64), one), *(_constants(widths) if widths else [])])
    return Int8Prefill(layers, int(nbytes), activations)
