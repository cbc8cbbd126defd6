"""Quantized modules: packed integer storage that dequantizes in the forward pass.

``QuantTensor`` holds one quantized weight (packed integers, scales, zero points) as buffers;
``QuantLinear`` replaces an ``nn.Linear``; ``QuantExperts`` replaces a fused MoE experts module
(transformers 5 stores DeepSeek experts as 3-D parameters ``gate_up_proj`` [E, 2I, H] and
``down_proj`` [E, H, I], not as ``nn.Linear``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .primitives import QuantizedWeight, dequantize, pack_int4, unpack_int4
from .scheme import WeightScheme
from dsq.core.layout import set_module as _set_module


class QuantTensor(nn.Module):
    """A quantized weight ``[..., out, in]`` stored packed.

    Buffers:
        packed: int4 -> uint8 ``[..., out, ceil(in/2)]`` (two values per byte);
                int8 -> int8 ``[..., out, in]``.
        scale: ``[..., out, groups]`` in the scale dtype.
        zero_point: int8 ``[..., out, groups]`` (asymmetric schemes only).
    """

    def __init__(self, qw: QuantizedWeight, scale_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.scheme = qw.scheme
        self.shape = tuple(qw.qweight.shape)
        packed = pack_int4(qw.qweight) if qw.scheme.bits == 4 else qw.qweight.clone()
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("scale", qw.scale.to(scale_dtype).contiguous())
        if qw.zero is not None:
            self.register_buffer("zero_point", qw.zero.contiguous())
        else:
            self.zero_point = None

    @property
    def in_features(self) -> int:
        return self.shape[-1]

    def unpacked(self, index: int | None = None) -> torch.Tensor:
        """Signed integer values (int8), optionally of one leading slice (an expert)."""
        packed = self.packed if index is None else self.packed[index]
        if self.scheme.bits == 4:
            return unpack_int4(packed, self.in_features)
        return packed

    def dequantize(self, dtype: torch.dtype, index: int | None = None) -> torch.Tensor:
        """Dequantized weight ``[out, in]`` (of expert ``index``) or ``[..., out, in]``."""
        scale = self.scale if index is None else self.scale[index]
        zero = self.zero_point
        if zero is not None and index is not None:
            zero = zero[index]
        return dequantize(self.unpacked(index), scale, zero, self.scheme, dtype)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, {self.scheme.describe()}"


def linear_groups(linear: nn.Module) -> int | None:
    """``n_groups`` of a grouped linear (DeepSeek-V4's ``o_a_proj``), None for a plain one."""
    groups = getattr(linear, "n_groups", None)
    return groups if isinstance(groups, int) else None


def apply_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n_groups: int | None) -> torch.Tensor:
    """``F.linear``, or the block-diagonal grouped matmul of DeepSeek-V4's ``o_a_proj``.

    Grouped: ``x`` ``[..., G, in_g]`` and ``weight`` ``[G * d_g, in_g]`` (group ``g`` owns rows
    ``g * d_g ... (g + 1) * d_g``); returns ``[..., G, d_g]``, each group projected by its own rows
    (one batched matmul, as transformers' ``DeepseekV4GroupedLinear``).
    """
    if n_groups is None:
        return F.linear(x, weight, bias)
    lead, in_g = x.shape[:-2], x.shape[-1]
    w = weight.view(n_groups, -1, in_g).transpose(1, 2)  # (G, in_g, d_g)
    y = torch.bmm(x.reshape(-1, n_groups, in_g).transpose(0, 1), w).transpose(0, 1)  # (tokens, G, d_g)
    if bias is not None:
        y = y + bias.view(n_groups, -1)
    return y.reshape(*lead, n_groups, -1)


class WeightDtypeView:
    """A quantized Linear's ``weight`` where model code reads ``linear.weight.dtype`` (:data:`WEIGHT_DTYPE_READERS`).

    There it is a data-less (``meta``) ``(out, in)`` tensor of the scales' dtype, so using its values fails;
    elsewhere the module has no ``weight`` (code that looks for one, e.g. peft's device placement, finds none).
    """

    weight_dtype_view: bool = False  # set by :func:`set_module` from the module's name

    @property
    def weight(self) -> torch.Tensor:
        if not self.weight_dtype_view:
            raise AttributeError(f"{type(self).__name__} holds integers, not a float weight")
        return torch.empty(self.out_features, self.in_features, dtype=self.weight_q.scale.dtype, device="meta")


class QuantLinear(WeightDtypeView, nn.Module):
    """Weight-only quantized replacement for ``nn.Linear``; computes in the input's dtype.

    ``n_groups``: the weight is DeepSeek-V4's grouped output projection (see :func:`apply_linear`);
    its quantized form keeps the grouped matmul.
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, scale_dtype: torch.dtype,
                 n_groups: int | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qw.qweight.shape
        self.weight_q = QuantTensor(qw, scale_dtype)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.n_groups = n_groups

    @classmethod
    def from_linear(cls, linear: nn.Linear, qw: QuantizedWeight) -> "QuantLinear":
        return cls(qw, linear.bias, scale_dtype=linear.weight.dtype, n_groups=linear_groups(linear))

    @property
    def scheme(self) -> WeightScheme:
        return self.weight_q.scheme


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_q.dequantize(x.dtype)  # (out, in)
        return apply_linear(x, w, self.bias, self.n_groups)

    def extra_repr(self) -> str:
        groups = "" if self.n_groups is None else f", n_groups={self.n_groups}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{groups}"


WEIGHT_DTYPE_READERS: tuple[str, ...] = ("indexer.weights_proj",)
"""Modules whose model code reads ``.weight.dtype`` (transformers' DeepSeek-V3.2 indexer casts its input to
``weights_proj.weight.dtype``); their :class:`QuantLinear` exposes a data-less ``weight`` view."""


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace submodule ``name`` of ``model`` with ``new`` (the swap helper of every quantize module)."""
    _set_module(model, name, new)
    if isinstance(new, WeightDtypeView):
        new.weight_dtype_view = name.endswith(WEIGHT_DTYPE_READERS)


def is_fused_experts(module: nn.Module) -> bool:
    """True for transformers' fused MoE experts (3-D ``gate_up_proj`` and ``down_proj``)."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and gate_up.dim() == 3
        and down.dim() == 3
    )


class GatedActivation(nn.Module):
    """An expert's gated activation ``act(gate) * up`` between ``gate_up_proj`` and ``down_proj``.

    DeepSeek-V4 clamps both halves first (``swiglu_limit``: ``gate <= limit``, ``|up| <= limit``);
    ``limit`` None is the plain SwiGLU of V2/V3 and every other fused-experts model.
    """

    def __init__(self, act_fn: nn.Module, limit: float | None = None) -> None:
        super().__init__()
        self.act_fn = act_fn
        self.limit = limit

    @classmethod
    def of(cls, experts: nn.Module) -> "GatedActivation":
        """The gated activation transformers' fused ``experts`` module applies (its ``act_fn`` and ``limit``)."""
        if isinstance(getattr(experts, "glu", None), GatedActivation):
            return experts.glu
        return cls(experts.act_fn, getattr(experts, "limit", None))

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # (n, I) each -> (n, I)
        if self.limit is not None:
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
        return self.act_fn(gate) * up

    def extra_repr(self) -> str:
        return "" if self.limit is None else f"limit={self.limit}"


def route_tokens(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    expert_forward: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The routed mix ``sum_k w_k * expert_k(x)`` over the experts that received tokens.

    ``hidden_states`` (tokens, H), ``top_k_index`` / ``top_k_weights`` (tokens, k); an index
    outside ``[0, num_experts)`` (transformers' marker of a dropped slot) is skipped.
    """
    out = torch.zeros_like(hidden_states)
    for expert in torch.unique(top_k_index).tolist():
        if not 0 <= expert < num_experts:
            continue
        token_idx, slot = torch.where(top_k_index == expert)
        y = expert_forward(expert, hidden_states[token_idx])  # (n, H)
        out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
    return out


class QuantExperts(nn.Module):
    """Quantized fused experts with the call signature of transformers' experts modules.

    ``forward(hidden_states (tokens, H), top_k_index (tokens, k), top_k_weights (tokens, k))``
    returns ``(tokens, H)``: each routed expert's SwiGLU output weighted by its routing weight.
    Only the weights of experts that received tokens are dequantized.
    """

    def __init__(self, gate_up: QuantizedWeight, down: QuantizedWeight, glu: GatedActivation, scale_dtype: torch.dtype) -> None:
        super().__init__()
        self.num_experts = gate_up.qweight.shape[0]
        self.hidden_dim = gate_up.qweight.shape[-1]
        self.intermediate_dim = down.qweight.shape[-1]
        self.gate_up_proj = QuantTensor(gate_up, scale_dtype)  # (E, 2I, H)
        self.down_proj = QuantTensor(down, scale_dtype)  # (E, H, I)
        self.glu = glu

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype

        def expert_forward(expert: int, x: torch.Tensor) -> torch.Tensor:  # (n, H) -> (n, H)
            gate, up = F.linear(x, self.gate_up_proj.dequantize(dtype, expert)).chunk(2, dim=-1)
            return F.linear(self.glu(gate, up), self.down_proj.dequantize(dtype, expert))

        return route_tokens(hidden_states, top_k_index, top_k_weights, self.num_experts, expert_forward)
