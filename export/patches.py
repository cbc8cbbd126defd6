"""Rewrites that make transformers' code traceable to ONNX, applied only while a graph is traced.

DeepSeek-V2's rotary embedding multiplies complex numbers (``torch.polar``, ``view_as_complex``);
ONNX has no complex type. :func:`traceable` swaps in the same rotation on real (cos, sin) pairs:
``(a + ib)(c + is) = (ac - bs) + i(as + bc)`` on consecutive pairs of the last dim.

A query with no key to attend to (a left-padded position: padding and the causal mask leave it nothing)
gets a zero output from PyTorch's ``scaled_dot_product_attention``; the traced graph's additive mask turns the
same row into a uniform average of every value. Real positions never see those rows, but activations quantized
per tensor at run time (``DynamicPerTensor``) take every position of the call into their range, padded ones
included, so :func:`traceable` also zeroes such rows in the graph, as PyTorch does.

Grouped-query attention (Llama, Qwen2: fewer key/value heads than query heads) is traced as one
``scaled_dot_product_attention`` call with ``enable_gqa`` (:func:`grouped_sdpa`), which the exporter writes as
one opset-23 ``Attention`` node reading the cache's key/value heads as they are; transformers' own CPU path
repeats every key and value head for each query head first (a copy of the whole cache per layer and step).
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

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


def _attends_some_key(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[batch, seq, 1, 1]`` 1 where a query row attends to at least one key, else 0 (None: no mask)."""
    if attention_mask is None:
        return None
    valid = attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(attention_mask.dtype).min
    return valid.any(dim=-1).transpose(1, 2)[..., None].to(torch.float32)  # [B, 1|H, S, T] -> [B, S, 1|H, 1]


def grouped_sdpa(original: Callable) -> Callable:
    """transformers' ``sdpa`` attention function as one ``scaled_dot_product_attention`` over the key/value heads
    (``enable_gqa``; output ``[batch, seq, heads, dim]``); calls the model does not make with a mask tensor and
    no position bias or softcap go to ``original``."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        plain = attention_mask is not None and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
        if not plain or dropout:
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            is_causal=is_causal, **kwargs)
        grouped = query.shape[1] != key.shape[1]  # [batch, heads, seq, dim]
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                                               enable_gqa=grouped)
        return out.transpose(1, 2).contiguous(), None

    return attention


def zero_unattended_rows(attention: Callable) -> Callable:
    """``attention`` (a transformers attention function: output ``[batch, seq, heads, dim]``) with the rows of
    queries that attend to no key set to zero, as ``scaled_dot_product_attention`` leaves them."""

    def wrapped(module, query, key, value, attention_mask, *args, **kwargs):
        out, weights = attention(module, query, key, value, attention_mask, *args, **kwargs)
        keep = _attends_some_key(attention_mask)
        return (out if keep is None else out * keep.to(out.dtype)), weights

    return wrapped


@contextlib.contextmanager
def _export_sdpa() -> Iterator[None]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get("sdpa")
    ALL_ATTENTION_FUNCTIONS["sdpa"] = zero_unattended_rows(grouped_sdpa(ALL_ATTENTION_FUNCTIONS["sdpa"]))
    try:
        yield
    finally:
        if previous is None:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
        else:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = previous


@contextlib.contextmanager
def traceable(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model`` computes the same function with ONNX-exportable ops."""
    with _export_sdpa(), _real_rotary(model):
        yield


@contextlib.contextmanager
def _real_rotary(model: nn.Module) -> Iterator[None]:
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
