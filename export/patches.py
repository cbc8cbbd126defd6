"""Rewrites that make transformers' code traceable to ONNX, applied only while a graph is traced.

DeepSeek-V2's rotary embedding multiplies complex numbers (``torch.polar``, ``view_as_complex``);
ONNX has no complex type. :func:`traceable` swaps in the same rotation on real (cos, sin) pairs:
``(a + ib)(c + is) = (ac - bs) + i(as + bc)`` on consecutive pairs of the last dim.
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn


def _real_rotary_forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, dim/2, 2]``: (cos, sin) of each position's angles, times the attention scaling."""
    freqs = position_ids[..., None].float() * self.inv_freq.float()  # (batch, seq, dim/2)
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling


def _real_apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = freqs.unsqueeze(1).unbind(-1)  # (batch, 1, seq, dim/2) each

    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        a, b = pairs.unbind(-1)
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


@contextlib.contextmanager
def traceable(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model`` computes the same function with ONNX-exportable ops."""
    if getattr(model.config, "model_type", None) != "deepseek_v2":
        yield
        return
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2

    rotary = [m for m in model.modules() if isinstance(m, v2.DeepseekV2RotaryEmbedding)]
    original = v2.apply_rotary_emb
    try:
        v2.apply_rotary_emb = _real_apply_rotary_emb
        for m in rotary:
            m.forward = types.MethodType(_real_rotary_forward, m)
        yield
    finally:
        v2.apply_rotary_emb = original
        for m in rotary:
            del m.forward
