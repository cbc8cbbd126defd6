"""Export-time modules: dsq's quantized layers rewritten as the ops ONNX Runtime runs.

:func:`prepare_for_export` swaps, in place on a model that is about to be exported:

* ``QuantLinear`` -> :class:`NBitsLinear` (``MatMulNBits`` from dsq's own packed integers, scales
  and zero points: nothing is re-quantized);
* ``W8A8Linear`` -> :class:`Int8Linear` (int8 activations + integer matmul);
* fused MoE experts (fp ``gate_up_proj``/``down_proj``, ``QuantExperts``, ``W8A8Experts``) -> one
  small module per expert (the Linears above), every expert in the graph, routed at run time:
  :class:`SparseRoutedExperts` (default: each token runs only its top-k experts) or
  :class:`DenseRoutedExperts` (every expert on every token, mixed with a dense routing weight);
  with ``moe_op=True``, :class:`dsq.export.moe_op.FusedRoutedExperts` (one ONNX Runtime ``MoE`` /
  ``QMoE`` node per layer) wherever that op carries the layer exactly, the sparse form elsewhere.

DeepSeek's routed experts are stored fused ([E, 2I, H]); exporters that trace the eager
``for expert in routed_experts`` loop keep only the experts the example input happened to reach.
Both forms here keep every expert's weights in the graph and decide the routing from the router's
top-k at run time; they differ in cost (sparse: k of E experts per token) and in graph shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dsq.core.errors import ExportError
from dsq.quantize.modules import GatedActivation, QuantExperts, QuantLinear, QuantTensor, is_fused_experts, set_module
from dsq.quantize.primitives import dequantize_weight, quantize_rtn
from dsq.quantize.scheme import PerChannel, WeightScheme
from dsq.quantize.w8a8 import ActivationScheme, DynamicPerTensor, StaticPerTensor, W8A8Experts, W8A8Linear

from . import moe_op, ops

MIN_BLOCK = 16  # MatMulNBits: block_size is a power of two >= 16


@dataclass(frozen=True)
class NBitsLayout:
    """How one weight becomes a MatMulNBits node: ``k`` inputs, ``n`` outputs, block size."""

    k: int
    n: int
    bits: int
    block_size: int

    @property
    def blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def blob(self) -> int:
        return self.block_size * self.bits // 8


MAX_CHANNEL_BLOCK = 1024


def _channel_block(k: int) -> int:
    """Block for a per-channel weight: the largest power of two in [16, 1024] dividing K (the row's one
    scale is repeated per block: no padding); else one padded block of ``2**ceil(log2 K)``."""
    block = MAX_CHANNEL_BLOCK
    while block >= MIN_BLOCK:
        if k % block == 0:
            return block
        block //= 2
    return max(MIN_BLOCK, 1 << (k - 1).bit_length())


def nbits_layout(scheme: WeightScheme, n: int, k: int, name: str) -> NBitsLayout:
    """The MatMulNBits layout of a dsq scheme (per-channel: see :func:`_channel_block`).

    Raises:
        ExportError: a group size MatMulNBits cannot express (not a power of two >= 16).
    """
    if isinstance(scheme.granularity, PerChannel):
        block = _channel_block(k)
    else:
        block = scheme.granularity.size
        if block < MIN_BLOCK or block & (block - 1):
            raise ExportError(
                f"{name}: group size {block} cannot be a MatMulNBits block (a power of two >= {MIN_BLOCK}); "
                "re-quantize with group 16, 32, 64, 128 or 256"
            )
    return NBitsLayout(k=k, n=n, bits=scheme.bits, block_size=block)


def _pack_blocks(u: torch.Tensor, layout: NBitsLayout) -> torch.Tensor:
    """Unsigned values ``[N, K]`` -> uint8 ``[N, blocks, blob]`` (4-bit: low nibble first)."""
    pad = layout.blocks * layout.block_size - layout.k
    u = F.pad(u.to(torch.int16), (0, pad), value=1 << (layout.bits - 1)).to(torch.uint8)  # padded values are 0
    if layout.bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    return u.reshape(layout.n, layout.blocks, layout.blob).contiguous()


def _pack_zero_points(zero: torch.Tensor, layout: NBitsLayout) -> torch.Tensor:
    """Signed zero points ``[N, blocks]`` -> MatMulNBits uint8 ``[N, ceil(blocks * bits / 8)]``."""
    u = (zero.to(torch.int16) + (1 << (layout.bits - 1))).to(torch.uint8)
    if layout.bits == 4:
        if u.shape[-1] % 2:
            u = F.pad(u, (0, 1), value=8)
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    return u.contiguous()


class NBitsLinear(nn.Module):
    """A weight-only quantized Linear as ``com.microsoft::MatMulNBits``.

    Buffers: ``b`` uint8 ``[N, blocks, blob]``, ``scales`` fp32 ``[N, blocks]``, ``zero_points`` uint8
    (asymmetric schemes only), ``bias`` fp32 ``[N]`` if the Linear had one.
    """

    def __init__(self, qt: QuantTensor, bias: torch.Tensor | None, name: str, accuracy_level: int, index: int | None = None) -> None:
        super().__init__()
        n, k = qt.shape[-2:]
        self.layout = nbits_layout(qt.scheme, n, k, name)
        self.accuracy_level = accuracy_level
        q = qt.unpacked(index).to(torch.int16)  # (N, K) signed
        self.register_buffer("b", _pack_blocks(q + (1 << (qt.scheme.bits - 1)), self.layout))
        scale = qt.scale if index is None else qt.scale[index]  # (N, groups)
        zero = qt.zero_point if index is None or qt.zero_point is None else qt.zero_point[index]
        if isinstance(qt.scheme.granularity, PerChannel):  # the row's scale (and zero) in every block
            scale = scale.expand(-1, self.layout.blocks)
            zero = zero.expand(-1, self.layout.blocks) if zero is not None else None
        if scale.shape[-1] != self.layout.blocks:
            raise ExportError(f"{name}: {scale.shape[-1]} scale groups do not match {self.layout.blocks} MatMulNBits blocks")
        self.register_buffer("scales", scale.float().contiguous())
        self.register_buffer("zero_points", _pack_zero_points(zero, self.layout) if zero is not None else None)
        self.register_buffer("bias", bias.detach().float().clone() if bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        y = ops.matmul_nbits(x, self.b, self.scales, self.zero_points, lay.k, lay.n, lay.bits, lay.block_size, self.accuracy_level)
        return y + self.bias if self.bias is not None else y


class Int8Linear(nn.Module):
    """W8A8: int8 activations (per token, per tensor, or one calibrated scale) times int8 weights, int32 accumulate.

    Buffers: ``w_t`` ``[K, N]``, transposed for the int8 matmul: uint8 = int8 weight + 128 (u8 x u8
    ``MatMulInteger`` with zero points, exact on any CPU) or, with ``signed``, the int8 weight itself (u8 x s8
    ``MatMulIntegerToFloat``, :data:`dsq.export.cpu_target.VNNI`); ``w_scale`` fp32
    ``[N]``, ``x_scale`` fp32 scalar (static only), ``bias``. ``per_tensor``: dynamic per-tensor asymmetric
    activations (:class:`dsq.quantize.w8a8.DynamicPerTensor`) instead of per token.
    """

    def __init__(self, packed: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor | None, bias: torch.Tensor | None,
                 signed: bool = False, per_tensor: bool = False) -> None:
        super().__init__()
        if per_tensor and x_scale is not None:
            raise ValueError("per-tensor dynamic activations take no calibrated x_scale")
        self.signed = signed
        self.per_tensor = per_tensor
        w_t = packed.t().to(torch.int8) if signed else (packed.t().to(torch.int16) + ops.W8_OFFSET).to(torch.uint8)
        self.register_buffer("w_t", w_t.contiguous())
        self.register_buffer("w_scale", w_scale.float().reshape(-1).contiguous())
        self.register_buffer("x_scale", x_scale.float().reshape(()).clone() if x_scale is not None else None)
        self.register_buffer("bias", bias.detach().float().clone() if bias is not None else None)

    @classmethod
    def of(cls, packed: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor | None, bias: torch.Tensor | None,
           act: ActivationScheme, signed: bool) -> "Int8Linear":
        """The export form of one weight of a W8A8 module with activation scheme ``act``."""
        return cls(packed, w_scale, x_scale, bias, signed, per_tensor=isinstance(act, DynamicPerTensor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_tensor:
            y = (ops.matmul_int8_tensor_s8 if self.signed else ops.matmul_int8_tensor)(x, self.w_t, self.w_scale)
        elif self.x_scale is None:
            token = ops.matmul_int8_token_s8 if self.signed else ops.matmul_int8_token
            y = token(x, self.w_t, self.w_scale)
        else:
            static = ops.matmul_int8_static_s8 if self.signed else ops.matmul_int8_static
            y = static(x, self.x_scale, self.w_t, self.w_scale)
        return y + self.bias if self.bias is not None else y


class _Expert(nn.Module):
    """One gated expert: ``down(glu(gate(x), up(x)))`` with ``gate_up`` producing ``[.., 2I]``."""

    def __init__(self, gate_up: nn.Module, down: nn.Module, glu: GatedActivation) -> None:
        super().__init__()
        self.gate_up = gate_up
        self.down = down
        self.glu = glu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.glu(gate, up))


def _plain_linear(weight: torch.Tensor) -> nn.Linear:
    out_f, in_f = weight.shape
    linear = nn.Linear(in_f, out_f, bias=False, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return linear


class DenseRoutedExperts(nn.Module):
    """Every expert in the graph; routing decided at run time.

    ``forward(hidden (T, H), top_k_index (T, k), top_k_weights (T, k))``: the dense routing weight
    ``R = scatter(zeros(T, E), index, weights)`` and ``sum_e R[:, e] * expert_e(hidden)``. Experts a
    token was not routed to contribute exactly 0, so the result equals the sparse mix; the cost is every
    expert on every token (E / k times the routed FLOPs).
    """

    def __init__(self, experts: list[_Expert]) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(hidden.shape[0], len(self.experts), dtype=top_k_weights.dtype)
        dense = dense.scatter(1, top_k_index, top_k_weights)  # (T, E)
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self.experts):
            out = out + (expert(hidden) * dense[:, e : e + 1]).to(hidden.dtype)
        return out


@torch.library.custom_op("dsq::split_rows", mutates_args=())
def split_rows(x: torch.Tensor, counts: torch.Tensor) -> list[torch.Tensor]:
    """``x [N, ...]`` cut along dim 0 into ``len(counts)`` consecutive pieces of ``counts[e]`` rows.

    ``torch.split`` needs its sizes as Python ints (one ``.item()`` each under tracing); this op takes
    them as a tensor, so the graph holds one ONNX ``Split`` whatever the number of experts.
    """
    return [piece.clone() for piece in torch.split(x, counts.tolist())]


@split_rows.register_fake
def _(x, counts):
    ctx = torch.library.get_ctx()
    return [x.new_empty((ctx.new_dynamic_size(), *x.shape[1:])) for _ in range(counts.shape[0])]


def translation_table() -> dict:
    """``custom_translation_table`` for the export: dsq's quantized ops (:func:`ops.translation_table`),
    the fused experts ops (:func:`moe_op.translation_table`) and :func:`split_rows` -> ``SplitToSequence`` +
    ``SequenceAt`` (the exporter's optimizer folds them into one ``Split`` with a sizes input)."""
    from onnxscript import opset21 as op

    def split(x, counts):
        pieces = op.SplitToSequence(x, counts, axis=0)
        return [op.SequenceAt(pieces, op.Constant(value_int=e)) for e in range(int(counts.shape[0]))]

    return {**ops.translation_table(), **moe_op.translation_table(), torch.ops.dsq.split_rows.default: split}


class SparseRoutedExperts(nn.Module):
    """Every expert in the graph; each token runs only its top-k experts (routing decided at run time).

    ``forward(hidden (T, H), top_k_index (T, k), top_k_weights (T, k))``: the ``T * k`` (token, slot)
    pairs are ordered by expert (``TopK`` on the expert ids), their token rows gathered once
    (``[T * k, H]``) and cut into one piece per expert (:func:`split_rows`: an expert nobody chose
    gets an empty piece); each expert runs on its piece, the outputs go back to their (token, slot)
    place (``ScatterND``) and are mixed with the routing weights: ``sum_j w[t, j] * expert_{idx[t, j]}(h_t)``.
    The cost is k expert evaluations per token; the graph has no data-dependent control flow.
    """

    def __init__(self, experts: list[_Expert]) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        tokens, k = top_k_index.shape
        slots = top_k_index.reshape(-1)  # (T * k,) expert of each (token, slot)
        n = slots.shape[0]
        order = torch.topk(slots, n, largest=False).indices  # (T * k,) slots grouped by expert
        ids = torch.arange(len(self.experts), dtype=slots.dtype, device=slots.device)
        counts = (slots.unsqueeze(0) == ids.unsqueeze(1)).sum(1)  # (E,) slots routed to each expert
        rows = hidden.index_select(0, torch.div(order, k, rounding_mode="trunc"))  # (T * k, H)
        y = torch.cat([expert(piece) for expert, piece in zip(self.experts, split_rows(rows, counts))])
        torch._check(y.shape[0] == n)  # the pieces' sizes sum to T * k
        per_slot = y.new_zeros((n, y.shape[-1])).index_put((order,), y)  # (T * k, H) in (token, slot) order
        mixed = per_slot.reshape(tokens, k, -1) * top_k_weights.unsqueeze(-1).to(per_slot.dtype)
        return mixed.sum(1).to(hidden.dtype)


RoutedExperts = SparseRoutedExperts | DenseRoutedExperts


def _experts_from_fp(module: nn.Module, form: type[RoutedExperts]) -> RoutedExperts:
    return form([
        _Expert(_plain_linear(module.gate_up_proj[e]), _plain_linear(module.down_proj[e]), GatedActivation.of(module))
        for e in range(module.gate_up_proj.shape[0])
    ])


def _experts_from_quant(module: QuantExperts, name: str, accuracy_level: int, form: type[RoutedExperts]) -> RoutedExperts:
    return form([
        _Expert(
            NBitsLinear(module.gate_up_proj, None, f"{name}.{e}.gate_up_proj", accuracy_level, index=e),
            NBitsLinear(module.down_proj, None, f"{name}.{e}.down_proj", accuracy_level, index=e),
            module.glu,
        )
        for e in range(module.num_experts)
    ])


def _experts_from_w8a8(module: W8A8Experts, form: type[RoutedExperts], signed: bool = False) -> RoutedExperts:
    static = isinstance(module.act, StaticPerTensor)
    experts = []
    for e in range(module.num_experts):
        gu_s = module.gate_up_input_scale[e] if static else None
        dn_s = module.down_input_scale[e] if static else None
        experts.append(_Expert(
            Int8Linear.of(module.gate_up_proj.packed[e], module.gate_up_proj.scale[e], gu_s, None, module.act, signed),
            Int8Linear.of(module.down_proj.packed[e], module.down_proj.scale[e], dn_s, None, module.act, signed),
            module.glu,
        ))
    return form(experts)


class Int8Embedding(nn.Module):
    """An embedding table stored int8, one symmetric scale per row (token): ``[V, H]`` + ``[V, 1]``."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", q.contiguous())
        self.register_buffer("scale", scale.float().contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ops.embedding_int8(ids, self.table, self.scale)


def quantize_embedding_(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``model``'s input embedding to int8 per row, in place (the weight becomes its dequantized
    value, so the torch model is the reference of the exported one). Returns ``(q [V, H], scale [V, 1])``.
    A tied output projection sees the same values.
    """
    weight = model.get_input_embeddings().weight
    qw = quantize_rtn(weight.detach().float(), WeightScheme(8, PerChannel(), True))
    with torch.no_grad():
        weight.copy_(dequantize_weight(qw).to(weight.dtype))
    return qw.qweight, qw.scale


@dataclass
class ExportPlan:
    """What :func:`prepare_for_export` did, by module name (for the export manifest)."""

    nbits: dict[str, str] = field(default_factory=dict)  # name -> scheme description
    int8: dict[str, str] = field(default_factory=dict)
    experts: dict[str, int] = field(default_factory=dict)  # name -> number of experts in the graph
    embedding: str | None = None  # description of a quantized input embedding
    dense_experts: bool = False  # experts as DenseRoutedExperts (every expert on every token)
    mla: dict[str, str] = field(default_factory=dict)  # MLA attention name -> absorbed or expanded (dsq.export.mla)
    fused: dict[str, str] = field(default_factory=dict)  # experts name -> "ort_moe" | "ort_qmoe" (one fused node)
    moe_op_refused: dict[str, str] = field(default_factory=dict)  # experts name -> why it is not one fused node
    signed_int8: bool = False  # W8A8 weights s8 for u8 x s8 kernels (MatMulIntegerToFloat), else u8 + 128 (MatMulInteger)

    @property
    def int8_op(self) -> str:
        """The graph op every W8A8 weight becomes."""
        return "com.microsoft::MatMulIntegerToFloat" if self.signed_int8 else "MatMulInteger"

    def form(self, name: str) -> str:
        """How routed-experts layer ``name`` runs: ``"ort_moe"`` / ``"ort_qmoe"`` (one fused ONNX Runtime node),
        ``"sparse"`` (top-k per token) or ``"dense"`` (all, masked)."""
        return self.fused.get(name) or ("dense" if self.dense_experts else "sparse")

    @property
    def expert_form(self) -> str:
        """The form of the routed-experts layers (:meth:`form`); forms joined by ``+`` where layers differ."""
        return "+".join(sorted({self.form(name) for name in self.experts} or {self.form("")}))

    def to_dict(self) -> dict:
        routed = {}
        for name, count in self.experts.items():
            routed[name] = {"experts": count, "form": self.form(name)}
            if name in self.moe_op_refused:
                routed[name]["moe_op_refused"] = self.moe_op_refused[name]
        return {"matmul_nbits": self.nbits, "int8_matmul": self.int8, "routed_experts": routed,
                "embedding": self.embedding, "mla_attention": self.mla}


def _fused_experts(model: nn.Module, name: str, module: nn.Module, accuracy_level: int, plan: ExportPlan,
                   standard_onnx: bool) -> moe_op.FusedRoutedExperts | None:
    """``module`` as one ``MoE`` / ``QMoE`` node, or None with the reason in ``plan.moe_op_refused``."""
    if standard_onnx:
        refusal = ("the portable format (DequantizeLinear weights) holds standard ONNX ops only; "
                   "MoE / QMoE are ONNX Runtime contrib ops")
    else:
        router = getattr(model.get_submodule(name.rpartition(".")[0]), "gate", None)  # DeepSeek's mlp.gate
        refusal = moe_op.fused_form_refusal(module, router)
    if refusal is not None:
        plan.moe_op_refused[name] = refusal
        return None
    fused = (moe_op.FusedRoutedExperts.from_quant(module, accuracy_level) if isinstance(module, QuantExperts)
             else moe_op.FusedRoutedExperts.from_fp(module.gate_up_proj, module.down_proj))
    plan.fused[name] = fused.layout.form
    return fused


def prepare_for_export(
    model: nn.Module,
    accuracy_level: int = 0,
    embedding: tuple[torch.Tensor, torch.Tensor] | None = None,
    dense_experts: bool = False,
    signed_int8: bool = False,
    moe_op: bool = False,
    standard_onnx: bool = False,
) -> ExportPlan:
    """Swap dsq's modules (and fused experts) for their export forms, in place.

    Args:
        model: a causal LM as the spine loads it (fp, or with dsq's quantized modules).
        accuracy_level: MatMulNBits ``accuracy_level`` (0: fp32 compute; 4: int8 compute).
        embedding: ``(q, scale)`` from :func:`quantize_embedding_`: the input embedding becomes
            :class:`Int8Embedding`.
        dense_experts: fused experts become :class:`DenseRoutedExperts` (every expert on every
            token) instead of :class:`SparseRoutedExperts` (each token's top-k only).
        signed_int8: W8A8 weights kept int8 for u8 x s8 kernels (``CpuTarget.signed_int8_weights``).
        moe_op: (unless ``dense_experts``) each routed-experts layer becomes one ONNX Runtime ``MoE`` / ``QMoE``
            node (:class:`dsq.export.moe_op.FusedRoutedExperts`) where that op carries it exactly (checked once
            per layout against the installed onnxruntime); the others stay sparse, ``plan.moe_op_refused`` says why.
        standard_onnx: the graph must hold standard ONNX ops only (the portable format): no fused node.

    Returns:
        The :class:`ExportPlan` naming every swapped module.

    Raises:
        ExportError: a module no export form exists for (e.g. bitsandbytes layers), named.
    """
    plan = ExportPlan(dense_experts=dense_experts, signed_int8=signed_int8)
    form = DenseRoutedExperts if dense_experts else SparseRoutedExperts
    if embedding is not None:
        model.set_input_embeddings(Int8Embedding(*embedding))
        plan.embedding = "int8 per-row symmetric"
    fuse = moe_op and not dense_experts  # dense_experts wins
    for name, module in list(model.named_modules()):
        routed = isinstance(module, (QuantExperts, W8A8Experts)) or is_fused_experts(module)
        fused = _fused_experts(model, name, module, accuracy_level, plan, standard_onnx) if fuse and routed else None
        if fused is not None:
            set_module(model, name, fused)
            plan.experts[name] = fused.num_experts
            if isinstance(module, QuantExperts):
                plan.nbits[name] = module.gate_up_proj.scheme.describe()
        elif isinstance(module, QuantLinear):
            set_module(model, name, NBitsLinear(module.weight_q, module.bias, name, accuracy_level))
            plan.nbits[name] = module.scheme.describe()
        elif isinstance(module, W8A8Linear):
            new = Int8Linear.of(module.weight_q.packed, module.weight_q.scale, module.input_scale, module.bias, module.act, signed_int8)
            set_module(model, name, new)
            plan.int8[name] = module.act.describe()
        elif isinstance(module, QuantExperts):
            set_module(model, name, _experts_from_quant(module, name, accuracy_level, form))
            plan.experts[name] = module.num_experts
            plan.nbits[name] = module.gate_up_proj.scheme.describe()
        elif isinstance(module, W8A8Experts):
            if dense_experts and isinstance(module.act, DynamicPerTensor):
                raise ExportError(
                    f"{name}: per-tensor activations of an expert are quantized over the tokens routed to it, and the "
                    "dense form sends every token to every expert; export these experts in the sparse form "
                    "(export.dense_experts: false)"
                )
            set_module(model, name, _experts_from_w8a8(module, form, signed_int8))
            plan.experts[name] = module.num_experts
            plan.int8[name] = module.act.describe()
        elif is_fused_experts(module):
            set_module(model, name, _experts_from_fp(module, form))
            plan.experts[name] = module.gate_up_proj.shape[0]
        elif type(module).__module__.startswith("bitsandbytes"):
            raise ExportError(f"{name}: bitsandbytes layers have no ONNX form; export a dsq (RTN/GPTQ/AWQ/QAT) artifact instead")
    return plan
