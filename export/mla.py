"""Absorbed multi-head latent attention (MLA) for the ONNX decoder: attention in the cached latent space.

The graph caches MLA's compressed latent ``c_KV`` ``[batch, 1, L, r]`` and the rotated RoPE key
``k_pe`` ``[batch, 1, L, d_rope]`` (:mod:`dsq.export.decoder`). transformers re-expands the whole cache
through ``kv_b_proj`` at every step: keys and values of every head, ``L x r x heads x (d_nope + d_v)``
multiply-adds per layer and token, which grows with the context and dominates a decode step.

DeepSeek-V2 (Section 2.1.2) folds ``kv_b_proj`` into the query and output instead. With ``kv_b_proj``'s
weight viewed per head as ``W_UK`` ``[heads, d_nope, r]`` and ``W_UV`` ``[heads, d_v, r]``:

* ``q_nope . k_nope = q_nope . (W_UK c) = (q_nope W_UK) . c``: each head's query is mapped once into
  the latent space (``q_lat = q_nope @ W_UK``, ``[batch, heads, s, r]``) and scored against the
  cached latent itself;
* ``softmax(.) @ v = softmax(.) @ (c W_UV^T) = (softmax(.) @ c) @ W_UV^T``: the attention output stays a
  latent per head until one ``[r, d_v]`` product per head.

A decode step then costs ``L x heads x (r + d_rope + r)`` in attention instead of re-expanding ``L`` latents,
and no key or value of any head is ever materialised. The function is the same up to float rounding;
the export validation compares the graph with transformers' own (expanded) forward.

A weight-only quantized ``kv_b_proj`` is absorbed from its dequantized weight (dsq's integers times
their scales, the fp32 weight the quantized model computes with), stored in the graph as fp32 ``W_UK``
and ``W_UV``, as serving engines do for MLA. A W8A8 ``kv_b_proj`` is not absorbed: it quantizes the
latent itself to int8, which absorption would skip, so those layers keep the expanded form.
"""
from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator

import torch
from torch import nn

from dsq.quantize.modules import QuantLinear

from .patches import zero_unattended_rows


class AbsorbedLatentProjection(nn.Module):
    """``kv_b_proj`` split per head for absorbed attention (never applied to the latent itself).

    Buffers: ``uk`` ``[heads, d_nope, r]`` (keys' up-projection, applied to queries) and ``uv_t``
    ``[heads, r, d_v]`` (values' up-projection, transposed, applied to the attention output).
    """

    def __init__(self, weight: torch.Tensor, heads: int, nope_dim: int, value_dim: int) -> None:
        super().__init__()
        per_head = weight.float().reshape(heads, nope_dim + value_dim, -1)  # rows are head-major: [k_nope | v]
        self.register_buffer("uk", per_head[:, :nope_dim].contiguous())
        self.register_buffer("uv_t", per_head[:, nope_dim:].transpose(1, 2).contiguous())

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("an absorbed kv_b_proj is folded into the attention; it is never applied to the latent")


def is_mla_attention(module: nn.Module) -> bool:
    """A transformers DeepSeek-V2/V3 MLA attention module (latent cache, ``kv_b_proj``, ``expand_kv``)."""
    return all(hasattr(module, a) for a in ("kv_b_proj", "kv_a_layernorm", "expand_kv", "kv_lora_rank", "qk_nope_head_dim"))


def _dense_weight(projection: nn.Module) -> torch.Tensor | None:
    """The fp32 ``[out, in]`` weight ``projection`` computes with, or None where absorption would change it."""
    if isinstance(projection, nn.Linear) and projection.bias is None:
        return projection.weight.detach().float()
    if isinstance(projection, QuantLinear) and projection.bias is None and projection.n_groups is None:
        return projection.weight_q.dequantize(torch.float32)
    return None  # W8A8 (quantizes the latent), biased or other forms keep the expanded attention


def absorb_latent_projections_(model: nn.Module) -> dict[str, str]:
    """Replace every absorbable MLA ``kv_b_proj`` by an :class:`AbsorbedLatentProjection`, in place.

    Returns ``{attention module name: what was absorbed}`` for the export manifest; attention modules whose
    ``kv_b_proj`` cannot be absorbed are listed with the reason and keep the expanded form.
    """
    done: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not is_mla_attention(module):
            continue
        projection = module.kv_b_proj
        weight = _dense_weight(projection)
        if weight is None:
            done[name] = f"expanded: {type(projection).__name__} kv_b_proj is not absorbed"
            continue
        source = "fp" if isinstance(projection, nn.Linear) else f"dequantized {projection.scheme.describe()}"
        module.kv_b_proj = AbsorbedLatentProjection(weight, module.num_heads, module.qk_nope_head_dim, module.v_head_dim)
        done[name] = f"absorbed: kv_b_proj ({source}) as fp32 W_UK/W_UV"
    return done


def _latent_kv(self, latent: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place of ``expand_kv``: keys ``[c_KV | k_pe]`` ``[batch, 1, L, r + d_rope]`` and values ``c_KV``."""
    return torch.cat((latent, k_rot), dim=-1), latent


def absorbed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """Eager attention over the latent cache (same signature and result as transformers' eager attention).

    ``query`` ``[batch, heads, s, d_nope + d_rope]``; ``key`` ``[batch, 1, L, r + d_rope]``; ``value``
    ``[batch, 1, L, r]``. Returns ``([batch, s, heads, d_v], attention weights)``.
    """
    projection: AbsorbedLatentProjection = module.kv_b_proj
    q_nope, q_rot = torch.split(query, [module.qk_nope_head_dim, module.qk_rope_head_dim], dim=-1)
    q_latent = torch.matmul(q_nope, projection.uk)  # [b, h, s, d_nope] @ [h, d_nope, r] -> [b, h, s, r]
    scores = torch.matmul(torch.cat((q_latent, q_rot), dim=-1), key.transpose(2, 3)) * scaling  # [b, h, s, L]
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    latent_out = torch.matmul(weights, value)  # [b, h, s, L] @ [b, 1, L, r] -> [b, h, s, r]
    out = torch.matmul(latent_out, projection.uv_t)  # [b, h, s, r] @ [h, r, d_v] -> [b, h, s, d_v]
    return out.transpose(1, 2).contiguous(), weights


def _eager_dispatch(module: nn.Module, *args, **kwargs):
    if isinstance(getattr(module, "kv_b_proj", None), AbsorbedLatentProjection):
        return absorbed_attention(module, *args, **kwargs)
    return sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kwargs)


# the eager path's additive mask averages every value for a query with no key; PyTorch's sdpa (the reference) gives 0
_dispatch = zero_unattended_rows(_eager_dispatch)


@contextlib.contextmanager
def absorbed_forward(model: nn.Module) -> Iterator[None]:
    """Within the block, attention modules with an absorbed ``kv_b_proj`` attend in the latent space.

    The model runs transformers' eager attention path (its mask is always a tensor), whose attention
    function is :func:`absorbed_attention` for absorbed modules and transformers' own for the others.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    absorbed = [m for m in model.modules() if isinstance(getattr(m, "kv_b_proj", None), AbsorbedLatentProjection)]
    if not absorbed:
        yield
        return
    config = model.config
    implementation = config._attn_implementation
    had_eager = "eager" in ALL_ATTENTION_FUNCTIONS._local_mapping
    previous_eager = ALL_ATTENTION_FUNCTIONS._local_mapping.get("eager")
    try:
        config._attn_implementation = "eager"
        ALL_ATTENTION_FUNCTIONS["eager"] = _dispatch
        for m in absorbed:
            m.expand_kv = types.MethodType(_latent_kv, m)
        yield
    finally:
        config._attn_implementation = implementation
        if had_eager:
            ALL_ATTENTION_FUNCTIONS["eager"] = previous_eager
        else:
            del ALL_ATTENTION_FUNCTIONS["eager"]
        for m in absorbed:
            del m.expand_kv
