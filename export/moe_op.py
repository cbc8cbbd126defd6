"""Routed experts as ONNX Runtime's fused contrib ops: ``com.microsoft::MoE`` (fp32) and ``QMoE`` (4/8-bit).

:class:`FusedRoutedExperts` has the forward contract of :class:`dsq.export.modules.SparseRoutedExperts`
(``hidden (T, H), top_k_index (T, k), top_k_weights (T, k) -> (T, H)``) and becomes one node per MoE layer
instead of a gather / per-expert matmuls / scatter subgraph. Its torch forward (the custom ops
:func:`moe` and :func:`qmoe`) is the reference mix ``sum_j w[t, j] * down_e(silu(gate_e x_t) * up_e x_t)``
with the weights the node holds (dequantized for QMoE), so the export is checked against exact math.

Weights (ORT's CPU kernel, ``activation_type="swiglu"``, ``swiglu_fusion=1``):

* ``fc1`` ``[E, 2I, H]`` with gate and up rows interleaved (row ``2j`` = gate ``j``, row ``2j+1`` = up ``j``);
  ORT's swiglu is ``g * sigmoid(alpha * g) * (u + beta)``, so ``activation_alpha=1, activation_beta=0`` is
  ``silu(g) * u``; ``fc2`` ``[E, H, I]``.
* QMoE: dsq's own integers, unsigned (``q + 2**(bits-1)``), 4-bit two per byte, low nibble first
  (``[E, N, K * bits / 8]``, ``weights_prepacked=0``: the raw layout); scales ``[E, N]`` (per channel) or
  ``[E, N, K / block]`` (``block_size``); asymmetric schemes add zero points (unsigned, ``[E, ceil(N * bits / 8)]``
  per channel, ``[E, N, ceil(blocks * bits / 8)]`` per block). ``w = (u - zero) * scale``: dsq's
  ``(q - z) * scale`` exactly.

Routing. DeepSeek's router (V3: grouped sigmoid top-k with the bias correction; V2: softmax top-k; both
scaled by ``routed_scaling_factor``) runs in the graph before the experts, as for the sparse form. The op
instead wants router logits and does its own top-k and softmax over the selected logits
(``normalize_routing_weights=0``). It is fed

    l[t, e] = log(max(w[t, j], tiny))  where e = top_k_index[t, j],   l[t, e] = -1e30 elsewhere,

and its output is multiplied by ``sum_j w[t, j]``. This is exact (up to the float rounding of one log and
one exp per weight, a few ulp): every selected logit is >= log(tiny) ~ -87.3 > -1e30, so the op's top-k picks
exactly dsq's k experts; ``exp(-1e30 - max)`` is exactly 0 in fp32, so its softmax gives
``exp(log w_j) / sum_i exp(log w_i) = w_j / sum_i w_i``, and times ``sum_i w_i`` that is ``w_j``. A weight of
0 is clamped to ``tiny`` before the log (``log 0 = -inf`` would rank below the -1e30 of an unselected expert):
its share becomes ``tiny / sum w``, far below fp32 rounding of the other terms, and a token whose weights are
all 0 gets a uniform softmax times ``sum w = 0``: exactly 0. Negative weights have no logarithm, so the trick
needs ``w >= 0``: DeepSeek's routers guarantee it (sigmoid / softmax scores times a non-negative
``routed_scaling_factor``), and :func:`routing_refusal` keeps the sparse form for any other router. (QMoE's
``router_weights`` input, meant for separate selection and mixing weights, does not work on ORT 1.32's CPU
kernel: probed, the mix did not follow it.)

What QMoE's CPU kernel carries exactly (probed with ORT 1.32, :func:`qmoe_refusal` for the rules,
:func:`ort_refusal` checks the installed ORT once per layout): int4 and int8 per channel, int4 groups of a power
of two >= 16, symmetric or asymmetric (zero points). Not carried (the layer keeps the sparse form, and the
export manifest says why): int8 groups (ORT has no fp32 kernel for block-wise 8-bit experts: it quantizes the
activations to int8), group sizes that are not a power of two >= 16, hidden or expert-intermediate widths that
are not a multiple of the group (QMoE's contract wants whole blocks), W8A8 experts (int8 activations), gated
activations other than SiLU or a clamped SwiGLU.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dsq.quantize.modules import GatedActivation, QuantExperts, QuantTensor, route_tokens
from dsq.quantize.primitives import pack_int4
from dsq.quantize.scheme import PerChannel, WeightScheme

from .ops import dequantize_unsigned, unpack_nbits

_LIB = "dsq"
DOMAIN = "com.microsoft"
TINY = float(torch.finfo(torch.float32).tiny)  # smallest normal fp32: the floor of a weight before its log
UNSELECTED = -1e30  # router logit of an expert the token was not routed to
MIN_BLOCK = 16  # QMoE block_size: a power of two >= 16
PROBE_TOLERANCE = 1e-4  # relative max |delta| of the ORT probe (exact kernels: ~1e-6; int8 activations: ~1e-2)


@dataclass(frozen=True)
class MoELayout:
    """fp32 experts as ``com.microsoft::MoE``."""

    op_type: ClassVar[str] = "MoE"
    form: ClassVar[str] = "ort_moe"

    def describe(self) -> str:
        return "fp32"


@dataclass(frozen=True)
class QMoELayout:
    """Weight-only quantized experts as ``com.microsoft::QMoE``.

    Attributes:
        bits: 4 or 8 (``expert_weight_bits``).
        block_size: quantization block along K; 0 for one scale per row (dsq's per-channel).
        symmetric: False adds zero points.
    """

    bits: int
    block_size: int
    symmetric: bool
    op_type: ClassVar[str] = "QMoE"
    form: ClassVar[str] = "ort_qmoe"

    def describe(self) -> str:
        group = f"block {self.block_size}" if self.block_size else "per-channel"
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'}"


FusedLayout = MoELayout | QMoELayout


def qmoe_layout(scheme: WeightScheme) -> QMoELayout:
    """The QMoE layout of a dsq scheme (no check that QMoE carries it: :func:`qmoe_refusal`)."""
    block = 0 if isinstance(scheme.granularity, PerChannel) else scheme.granularity.size
    return QMoELayout(scheme.bits, block, scheme.symmetric)


# ----------------------------------------------------------------------------- what the op can carry


def qmoe_refusal(scheme: WeightScheme, hidden: int, intermediate: int) -> str | None:
    """Why QMoE cannot carry experts of ``scheme`` (``gate_up`` ``[E, 2I, H]``, ``down`` ``[E, H, I]``)
    exactly, or None. The rules of ORT's QMoE contract and of its CPU kernel (see the module docstring)."""
    if isinstance(scheme.granularity, PerChannel):
        if scheme.bits == 4 and (hidden % 2 or intermediate % 2):
            return f"int4 rows of {hidden} / {intermediate} values are not whole bytes (QMoE packs two values per byte, per row)"
        return None
    size = scheme.granularity.size
    if scheme.bits == 8:
        return ("int8 groups: ONNX Runtime's CPU QMoE has no fp32 kernel for block-wise 8-bit experts "
                "(it quantizes the activations to int8), so it would not reproduce the weight-only result")
    if size < MIN_BLOCK or size & (size - 1):
        return f"group size {size} is not a QMoE block_size (a power of two >= {MIN_BLOCK})"
    ragged = [f"{what} {width}" for what, width in (("hidden size", hidden), ("expert intermediate size", intermediate))
              if width % size]
    if ragged:
        return (f"{' and '.join(ragged)} not a multiple of the group size {size} (a ragged last group); "
                "QMoE's contract wants whole blocks along K")
    return None


def activation_refusal(glu: GatedActivation) -> str | None:
    """Why the op's ``silu(gate) * up`` is not this gated activation, or None."""
    from transformers.activations import SiLUActivation

    if glu.limit is not None:
        return f"the experts clamp their SwiGLU (swiglu_limit {glu.limit}), which the fused form does not carry"
    if not isinstance(glu.act_fn, (nn.SiLU, SiLUActivation)):
        return f"the experts' gated activation is {type(glu.act_fn).__name__}, not SiLU (the op computes silu(gate) * up)"
    return None


def routing_refusal(router: nn.Module | None) -> str | None:
    """Why the routing weights may be negative (the op's log-weight routing needs ``w >= 0``), or None.

    ``router``: the module beside the experts that computes ``top_k_weights`` (DeepSeek's ``mlp.gate``).
    """
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    if not isinstance(router, (DeepseekV2TopkRouter, DeepseekV3TopkRouter)):
        found = type(router).__name__ if router is not None else "no router module ('gate') beside the experts"
        return (f"the router ({found}) is not one known to give non-negative routing weights, which the fused op's "
                "log-weight routing needs")
    factor = float(router.routed_scaling_factor)
    if not factor >= 0:
        return f"routed_scaling_factor {factor} makes routing weights negative; the fused op's log-weight routing needs them >= 0"
    return None


# ----------------------------------------------------------------------------- the weights as the op wants them


def _interleave_rows(t: torch.Tensor) -> torch.Tensor:
    """``[E, 2I, ...]`` rows ``[gate_0 .. gate_{I-1}, up_0 .. up_{I-1}]`` -> ``[gate_0, up_0, gate_1, up_1, ...]``."""
    half = t.shape[1] // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
    return t.index_select(1, order).contiguous()


def _as_uint8(q: torch.Tensor) -> torch.Tensor:
    """Signed int8 values stored unsigned (``q + 128``), as QMoE reads 8-bit weights and zero points."""
    return (q.to(torch.int16) + 128).to(torch.uint8)


@dataclass(frozen=True)
class QMoEWeight:
    """One projection of every expert as QMoE inputs: ``weight`` uint8 ``[E, N, K * bits / 8]``, ``scales``
    fp32 ``[E, N]`` or ``[E, N, K / block]``, ``zero_points`` uint8 (asymmetric only)."""

    weight: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None


def qmoe_weight(qt: QuantTensor, interleave: bool) -> QMoEWeight:
    """dsq's packed integers of ``qt`` (``[E, N, K]``) as QMoE inputs; ``interleave``: gate/up rows of ``fc1``."""
    bits = qt.scheme.bits
    # dsq's int4 bytes already hold q + 8, low nibble first (pack_int4); int8 is stored signed
    weight = qt.packed if bits == 4 else _as_uint8(qt.packed)
    scales = qt.scale.float()  # (E, N, groups)
    zero = qt.zero_point  # int8 (E, N, groups) or None
    if interleave:
        weight, scales = _interleave_rows(weight), _interleave_rows(scales)
        zero = _interleave_rows(zero) if zero is not None else None
    per_row = isinstance(qt.scheme.granularity, PerChannel)
    if per_row:
        scales = scales[..., 0]
        zero = zero[..., 0] if zero is not None else None  # (E, N): packed along N
    # zero points like the weights: 4-bit two per byte (q + 8, low nibble first), 8-bit stored unsigned
    zero_points = None if zero is None else pack_int4(zero) if bits == 4 else _as_uint8(zero)
    return QMoEWeight(weight.contiguous(), scales.contiguous(), zero_points)


def qmoe_dequantize(weight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, bits: int,
                    block_size: int) -> torch.Tensor:
    """The fp32 weight ``[N, K]`` one expert's QMoE inputs stand for: ``(u - zero) * scale`` per block (or row).

    Args:
        weight: uint8 ``[N, K * bits / 8]``; scales ``[N]`` or ``[N, K / block_size]``; zero_points uint8
        ``[ceil(N * bits / 8)]`` (per row) or ``[N, ceil(blocks * bits / 8)]``, None for ``2**(bits-1)``.
    """
    n = weight.shape[0]
    k = weight.shape[-1] * 8 // bits
    u = unpack_nbits(weight, bits, k).float()  # (N, K) unsigned
    scale = scales.float().reshape(n, -1)  # (N, groups)
    groups = scale.shape[-1]
    if zero_points is None:
        zero = torch.full((n, groups), float(1 << (bits - 1)))
    elif block_size:
        zero = unpack_nbits(zero_points, bits, groups).float()
    else:
        zero = unpack_nbits(zero_points.reshape(1, -1), bits, n).float().reshape(n, 1)
    return dequantize_unsigned(u, zero, scale, block_size or k)


# ----------------------------------------------------------------------------- torch custom ops (eager = reference)


def _mix(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int,
         expert_weights) -> torch.Tensor:
    """``sum_j w[t, j] * down_e(silu(gate_e x_t) * up_e x_t)``; ``expert_weights(e)`` -> (fc1 ``[2I, H]``
    interleaved, fc2 ``[H, I]``) in fp32."""

    def forward(expert: int, x: torch.Tensor) -> torch.Tensor:  # (n, H) -> (n, H)
        fc1, fc2 = expert_weights(expert)
        gate_up = x.float() @ fc1.t()  # (n, 2I): gate_j at 2j, up_j at 2j + 1
        return (F.silu(gate_up[:, 0::2]) * gate_up[:, 1::2]) @ fc2.t()

    return route_tokens(hidden, top_k_index, top_k_weights.float(), num_experts, forward)


@torch.library.custom_op(f"{_LIB}::moe", mutates_args=())
def moe(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, fc1: torch.Tensor,
        fc2: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """fp32 routed experts (``com.microsoft::MoE``): ``hidden (T, H)``, ``fc1 [E, 2I, H]`` (gate/up rows
    interleaved), ``fc2 [E, H, I]``; returns ``(T, H)``."""
    return _mix(hidden, top_k_index, top_k_weights, num_experts, lambda e: (fc1[e].float(), fc2[e].float()))


@moe.register_fake
def _(hidden, top_k_index, top_k_weights, fc1, fc2, num_experts, top_k):
    return hidden.new_empty(hidden.shape)


@torch.library.custom_op(f"{_LIB}::qmoe", mutates_args=())
def qmoe(
    hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    fc1: torch.Tensor, fc1_scales: torch.Tensor, fc1_zero_points: torch.Tensor | None,
    fc2: torch.Tensor, fc2_scales: torch.Tensor, fc2_zero_points: torch.Tensor | None,
    num_experts: int, top_k: int, bits: int, block_size: int, accuracy_level: int,
) -> torch.Tensor:
    """Weight-only quantized routed experts (``com.microsoft::QMoE``); see :class:`QMoEWeight` for the inputs."""

    def dequantized(e: int) -> tuple[torch.Tensor, torch.Tensor]:
        z1 = fc1_zero_points[e] if fc1_zero_points is not None else None
        z2 = fc2_zero_points[e] if fc2_zero_points is not None else None
        return (qmoe_dequantize(fc1[e], fc1_scales[e], z1, bits, block_size),
                qmoe_dequantize(fc2[e], fc2_scales[e], z2, bits, block_size))

    return _mix(hidden, top_k_index, top_k_weights, num_experts, dequantized)


@qmoe.register_fake
def _(hidden, top_k_index, top_k_weights, fc1, fc1_scales, fc1_zero_points, fc2, fc2_scales, fc2_zero_points,
      num_experts, top_k, bits, block_size, accuracy_level):
    return hidden.new_empty(hidden.shape)


# ----------------------------------------------------------------------------- the module


class FusedRoutedExperts(nn.Module):
    """Every routed expert in one ``MoE`` / ``QMoE`` node; routing decided at run time by dsq's router.

    ``forward(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``, the contract of
    ``SparseRoutedExperts`` (``top_k_weights >= 0``: see the module docstring). Buffers: ``fc1``, ``fc2`` and,
    for QMoE, ``fc1_scales``, ``fc2_scales``, ``fc1_zero_points``, ``fc2_zero_points`` (asymmetric only).
    """

    def __init__(self, layout: FusedLayout, fc1: torch.Tensor, fc2: torch.Tensor,
                 scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                 zero_points: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
                 accuracy_level: int = 0) -> None:
        super().__init__()
        self.layout = layout
        self.accuracy_level = accuracy_level
        self.num_experts = fc1.shape[0]
        self.register_buffer("fc1", fc1)
        self.register_buffer("fc2", fc2)
        scales, zero_points = scales or (None, None), zero_points or (None, None)
        self.register_buffer("fc1_scales", scales[0])
        self.register_buffer("fc2_scales", scales[1])
        self.register_buffer("fc1_zero_points", zero_points[0])
        self.register_buffer("fc2_zero_points", zero_points[1])

    @classmethod
    def from_fp(cls, gate_up: torch.Tensor, down: torch.Tensor) -> FusedRoutedExperts:
        """From transformers' fused fp experts: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``."""
        fc1 = _interleave_rows(gate_up.detach().float())
        return cls(MoELayout(), fc1, down.detach().float().contiguous())

    @classmethod
    def from_quant(cls, experts: QuantExperts, accuracy_level: int = 0) -> FusedRoutedExperts:
        """From dsq's :class:`QuantExperts`, its integers unchanged (:func:`qmoe_weight`)."""
        fc1 = qmoe_weight(experts.gate_up_proj, interleave=True)
        fc2 = qmoe_weight(experts.down_proj, interleave=False)
        return cls(qmoe_layout(experts.gate_up_proj.scheme), fc1.weight, fc2.weight, (fc1.scales, fc2.scales),
                   (fc1.zero_points, fc2.zero_points), accuracy_level)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        top_k = top_k_index.shape[1]
        if isinstance(self.layout, MoELayout):
            return moe(hidden, top_k_index, top_k_weights, self.fc1, self.fc2, self.num_experts, top_k)
        lay = self.layout
        return qmoe(hidden, top_k_index, top_k_weights, self.fc1, self.fc1_scales, self.fc1_zero_points, self.fc2,
                    self.fc2_scales, self.fc2_zero_points, self.num_experts, top_k, lay.bits, lay.block_size,
                    self.accuracy_level)

    def extra_repr(self) -> str:
        return f"{self.layout.op_type}, {self.layout.describe()}, experts={self.num_experts}"


# ----------------------------------------------------------------------------- ONNX: schemas, attributes, translation

_MOE_INPUTS = ("input", "router_probs", "fc1_experts_weights", "fc1_experts_bias", "fc2_experts_weights",
               "fc2_experts_bias", "fc3_experts_weights", "fc3_experts_bias")
_QMOE_INPUTS = ("input", "router_probs", "fc1_experts_weights", "fc1_scales", "fc1_experts_bias", "fc2_experts_weights",
                "fc2_scales", "fc2_experts_bias", "fc3_experts_weights", "fc3_scales", "fc3_experts_bias",
                "fc1_zero_points", "fc2_zero_points", "fc3_zero_points")
_REQUIRED = {"input", "router_probs", "fc1_experts_weights", "fc2_experts_weights"}


def node_attributes(layout: FusedLayout, top_k: int, accuracy_level: int = 0) -> dict:
    """The node's attributes (the translation and :func:`ort_refusal` use the same)."""
    attrs = {"k": top_k, "activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0,
             "activation_beta": 0.0, "normalize_routing_weights": 0}
    if isinstance(layout, QMoELayout):
        attrs.update(expert_weight_bits=layout.bits, weights_prepacked=0, accuracy_level=accuracy_level)
        if layout.block_size:
            attrs["block_size"] = layout.block_size
    return attrs


def node_inputs(layout: FusedLayout, **given) -> list:
    """Positional inputs of the node (``None`` for an absent optional one, trailing ones dropped)."""
    names = _MOE_INPUTS if isinstance(layout, MoELayout) else _QMOE_INPUTS
    inputs = [given.pop(name, None) for name in names]
    if given:
        raise TypeError(f"{layout.op_type} has no inputs {sorted(given)}")
    while inputs[-1] is None:
        inputs.pop()
    return inputs


def _schema(op_type: str):
    """The ``com.microsoft`` schema of ``MoE`` / ``QMoE`` (inputs in ORT's order, the attributes dsq sets).

    The onnx package knows only the standard domain; onnxscript needs a schema to build the node.
    Registered once, on first export.
    """
    import onnx
    from onnx.defs import OpSchema

    try:
        return onnx.defs.get_schema(op_type, 1, DOMAIN)
    except onnx.defs.SchemaError:
        pass
    param, option = OpSchema.FormalParameter, OpSchema.FormalParameterOption
    attr, types = OpSchema.Attribute, OpSchema.AttrType
    quantized = op_type == "QMoE"

    def input_type(name: str) -> str:
        if not quantized or name in ("input", "router_probs") or name.endswith("_bias"):
            return "T"
        return "T2" if name.endswith("_scales") else "T1"

    inputs = [param(name, input_type(name), param_option=option.Single if name in _REQUIRED else option.Optional)
              for name in (_QMOE_INPUTS if quantized else _MOE_INPUTS)]
    constraints = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations")]
    if quantized:
        constraints += [("T1", ["tensor(uint8)"], "packed weights and zero points"),
                        ("T2", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "scales")]
    ints = ["k", "swiglu_fusion", "normalize_routing_weights", "use_sparse_mixer"]
    ints += ["expert_weight_bits", "block_size", "accuracy_level", "weights_prepacked"] if quantized else []
    attributes = [attr(name, types.INT, required=False) for name in ints]
    attributes += [attr("activation_type", types.STRING, required=False)]
    attributes += [attr(name, types.FLOAT, required=False) for name in ("activation_alpha", "activation_beta", "swiglu_limit")]
    schema = OpSchema(op_type, DOMAIN, 1, inputs=inputs, outputs=[param("output", "T")],
                      type_constraints=constraints, attributes=attributes)
    onnx.defs.register_schema(schema)
    return schema


def translation_table() -> dict:
    """``custom_translation_table`` entries: :func:`moe` -> ``MoE``, :func:`qmoe` -> ``QMoE``, each with the
    log-weight router logits and the ``sum w`` factor of the module docstring."""
    from onnxscript import opset21 as op
    from onnxscript import values

    opset = values.Opset(DOMAIN, 1)
    moe_op = values.Op(opset, "MoE", _schema("MoE"))
    qmoe_op = values.Op(opset, "QMoE", _schema("QMoE"))

    def routing(top_k_index, top_k_weights, num_experts: int):
        """``(router logits (T, E), sum_j w (T, 1))``: log(max(w, tiny)) at the chosen experts, -1e30 elsewhere."""
        log_w = op.Log(op.Max(top_k_weights, op.Constant(value_float=TINY)))
        shape = op.Concat(op.Shape(top_k_index, start=0, end=1), op.Constant(value_ints=[num_experts]), axis=0)
        logits = op.ScatterElements(op.Expand(op.Constant(value_float=UNSELECTED), shape), top_k_index, log_w, axis=1)
        return logits, op.ReduceSum(top_k_weights, op.Constant(value_ints=[-1]), keepdims=1)

    def fp(hidden, top_k_index, top_k_weights, fc1, fc2, num_experts: int, top_k: int):
        logits, total = routing(top_k_index, top_k_weights, num_experts)
        layout = MoELayout()
        inputs = node_inputs(layout, input=hidden, router_probs=logits, fc1_experts_weights=fc1, fc2_experts_weights=fc2)
        return op.Mul(moe_op(*inputs, **node_attributes(layout, top_k)), total)

    def quantized(hidden, top_k_index, top_k_weights, fc1, fc1_scales, fc1_zero_points, fc2, fc2_scales, fc2_zero_points,
                  num_experts: int, top_k: int, bits: int, block_size: int, accuracy_level: int):
        logits, total = routing(top_k_index, top_k_weights, num_experts)
        layout = QMoELayout(bits, block_size, fc1_zero_points is None)
        inputs = node_inputs(layout, input=hidden, router_probs=logits, fc1_experts_weights=fc1, fc1_scales=fc1_scales,
                             fc2_experts_weights=fc2, fc2_scales=fc2_scales, fc1_zero_points=fc1_zero_points,
                             fc2_zero_points=fc2_zero_points)
        return op.Mul(qmoe_op(*inputs, **node_attributes(layout, top_k, accuracy_level)), total)

    return {torch.ops.dsq.moe.default: fp, torch.ops.dsq.qmoe.default: quantized}


# ----------------------------------------------------------------------------- does the installed ORT run it?


def _probe_experts(layout: FusedLayout) -> FusedRoutedExperts:
    """Tiny random experts of ``layout`` (4 experts; K a multiple of the block)."""
    from dsq.quantize.primitives import quantize_rtn_slices
    from dsq.quantize.scheme import PerGroup

    block = layout.block_size if isinstance(layout, QMoELayout) and layout.block_size else MIN_BLOCK
    hidden, inter = 2 * block, block
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(4, 2 * inter, hidden, generator=gen) * 0.2
    down = torch.randn(4, hidden, inter, generator=gen) * 0.2
    if isinstance(layout, MoELayout):
        return FusedRoutedExperts.from_fp(gate_up, down)
    granularity = PerGroup(layout.block_size) if layout.block_size else PerChannel()
    scheme = WeightScheme(layout.bits, granularity, layout.symmetric)
    experts = QuantExperts(quantize_rtn_slices(gate_up, scheme), quantize_rtn_slices(down, scheme),
                           GatedActivation(nn.SiLU()), torch.float32)
    return FusedRoutedExperts.from_quant(experts)


def _probe_model(experts: FusedRoutedExperts, top_k: int):
    """A one-node ONNX model of ``experts``' op: inputs ``input`` and ``router_probs``, weights as initializers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    layout = experts.layout
    buffers = {"fc1_experts_weights": experts.fc1, "fc2_experts_weights": experts.fc2}
    if isinstance(layout, QMoELayout):
        buffers.update(fc1_scales=experts.fc1_scales, fc2_scales=experts.fc2_scales,
                       fc1_zero_points=experts.fc1_zero_points, fc2_zero_points=experts.fc2_zero_points)
    present = {name: name for name, t in buffers.items() if t is not None}
    inputs = node_inputs(layout, input="input", router_probs="router_probs", **present)
    node = helper.make_node(layout.op_type, [i or "" for i in inputs], ["output"], domain=DOMAIN,
                            **node_attributes(layout, top_k))
    graph = helper.make_graph(
        [node], "probe",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("input", "router_probs")],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(buffers[n].numpy(), n) for n in present],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)],
                             ir_version=onnx.IR_VERSION)


@functools.cache
def ort_refusal(layout: FusedLayout) -> str | None:
    """Why the installed onnxruntime's CPU EP cannot run ``layout``'s op as dsq builds it, or None.

    Once per layout and process: a one-node session on tiny random experts (4 experts, top-2, 3 tokens),
    compared with :class:`FusedRoutedExperts`' reference forward (relative max |delta| <= 1e-4). The router
    logits are built as the graph builds them (module docstring).
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return f"onnxruntime is not installed ({exc})"
    top_k, tokens = 2, 3
    experts = _probe_experts(layout)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(tokens, experts.fc2.shape[1], generator=gen)
    index = torch.stack([torch.randperm(experts.num_experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen) + 0.1
    logits = torch.full((tokens, experts.num_experts), UNSELECTED).scatter(1, index, weights.clamp_min(TINY).log())
    what = f"onnxruntime {ort.__version__}'s CPU {layout.op_type} ({layout.describe()}, swiglu interleaved)"
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 4  # the refusal is returned, not logged
        session = ort.InferenceSession(_probe_model(experts, top_k).SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": hidden.numpy(), "router_probs": logits.numpy()})[0]
    except Exception as exc:  # noqa: BLE001 (ORT raises its own types; the message says what it refused)
        return f"{what} refused the node: {str(exc).splitlines()[0][:300]}"
    want = experts(hidden, index, weights)
    got = torch.from_numpy(got) * weights.sum(-1, keepdim=True)
    err = float((got - want).abs().max())
    if not err <= PROBE_TOLERANCE * float(want.abs().max()):
        return f"{what} does not reproduce the experts' weights: max |delta| {err:.3g} on a probe (|y| <= {float(want.abs().max()):.3g})"
    return None


def fused_form_refusal(experts: nn.Module, router: nn.Module | None) -> str | None:
    """Why a routed-experts module cannot become :class:`FusedRoutedExperts`, or None.

    Args:
        experts: transformers' fused fp experts or dsq's :class:`QuantExperts` (anything else, e.g. W8A8
            experts, is refused with the reason).
        router: the module computing the routing weights (DeepSeek's ``mlp.gate``).
    """
    from dsq.quantize.modules import is_fused_experts

    if isinstance(experts, QuantExperts):
        layout: FusedLayout = qmoe_layout(experts.gate_up_proj.scheme)
        refusal = qmoe_refusal(experts.gate_up_proj.scheme, experts.hidden_dim, experts.intermediate_dim)
    elif is_fused_experts(experts):
        layout, refusal = MoELayout(), None
    else:
        return f"{type(experts).__name__} (int8 activations) has no MoE / QMoE form"
    return (refusal or activation_refusal(GatedActivation.of(experts)) or routing_refusal(router)
            or ort_refusal(layout))
