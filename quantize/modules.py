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
from dsq.core.layout import set_module  # noqa: F401  (re-exported: the module-swap helper of every quantize module)


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


class QuantLinear(nn.Module):
    """Weight-only quantized replacement for ``nn.Linear``; computes in the input's dtype."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, scale_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = qw.qweight.shape
        self.weight_q = QuantTensor(qw, scale_dtype)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, qw: QuantizedWeight) -> "QuantLinear":
        return cls(qw, linear.bias, scale_dtype=linear.weight.dtype)

    @property
    def scheme(self) -> WeightScheme:
        return self.weight_q.scheme

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_q.dequantize(x.dtype)  # (out, in)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


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

    def __init__(self, gate_up: QuantizedWeight, down: QuantizedWeight, act_fn: nn.Module, scale_dtype: torch.dtype) -> None:
        super().__init__()
        self.num_experts = gate_up.qweight.shape[0]
        self.hidden_dim = gate_up.qweight.shape[-1]
        self.intermediate_dim = down.qweight.shape[-1]
        self.gate_up_proj = QuantTensor(gate_up, scale_dtype)  # (E, 2I, H)
        self.down_proj = QuantTensor(down, scale_dtype)  # (E, H, I)
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype

        def expert_forward(expert: int, x: torch.Tensor) -> torch.Tensor:  # (n, H) -> (n, H)
            gate, up = F.linear(x, self.gate_up_proj.dequantize(dtype, expert)).chunk(2, dim=-1)
            return F.linear(self.act_fn(gate) * up, self.down_proj.dequantize(dtype, expert))

        return route_tokens(hidden_states, top_k_index, top_k_weights, self.num_experts, expert_forward)
