"""The flat decoder the ONNX graph is traced from, and its input/output names and cache layout.

Inputs: ``input_ids`` int64 ``[batch, seq]``, ``attention_mask`` int64 ``[batch, past + seq]``,
``position_ids`` int64 ``[batch, seq]``, ``past_key_values.N.key`` / ``.value`` float
``[batch, kv_heads, past, head_dim]``. Outputs: ``logits`` ``[batch, seq, vocab]`` and
``present.N.key`` / ``.value`` ``[batch, kv_heads, past + seq, head_dim]``. One graph serves prefill
(``past = 0``) and decode.

MLA (DeepSeek-V2/V3) cache layout: the cache holds the *compressed* latent, one head, as
transformers 5 keeps it: the "key" slot is the normalised latent ``c_KV``
``[batch, 1, len, kv_lora_rank]`` (after ``kv_a_layernorm``, before ``kv_b_proj``) and the "value"
slot is the shared RoPE key ``k_pe`` ``[batch, 1, len, qk_rope_head_dim]``, already rotated. The graph
attends in the latent space with ``kv_b_proj`` folded into query and output (:mod:`dsq.export.mla`), or,
with ``absorb_mla=False``, re-expands keys and values of every head through ``kv_b_proj`` at each step. For
DeepSeek-V3 (kv_lora_rank 512, rope dim 64) that is 576 values per token and layer instead of
128 heads x (192 + 128) = 40960 for an expanded cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


@dataclass(frozen=True)
class CacheLayout:
    """Per-layer KV cache shape ``[batch, heads, len, dim]`` of one architecture.

    Attributes:
        num_layers: decoder layers (one key and one value per layer).
        kv_heads: heads stored in the cache (1 under MLA: the latent is shared by every head).
        key_dim: last dim of the "key" slot; ``value_dim``: of the "value" slot (under MLA: the
            latent rank and the RoPE dim).
        mla: the model uses multi-head latent attention.
    """

    num_layers: int
    kv_heads: int
    key_dim: int
    value_dim: int
    mla: bool

    def to_dict(self) -> dict:
        return {
            "num_layers": self.num_layers, "kv_heads": self.kv_heads, "key_head_dim": self.key_dim,
            "value_head_dim": self.value_dim, "mla": self.mla,
            "shape": "[batch, kv_heads, past_sequence_length, head_dim]",
        }


def cache_layout(config) -> CacheLayout:
    """The cache layout of a transformers config (Llama, Qwen2, DeepSeek-V2/V3)."""
    if getattr(config, "kv_lora_rank", None):  # MLA
        return CacheLayout(
            num_layers=config.num_hidden_layers,
            kv_heads=1,
            key_dim=config.kv_lora_rank,  # normalised latent c_KV
            value_dim=config.qk_rope_head_dim,  # rotated k_pe
            mla=True,
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return CacheLayout(config.num_hidden_layers, kv_heads, head_dim, head_dim, mla=False)


def input_names(layout: CacheLayout) -> list[str]:
    names = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS]
    for i in range(layout.num_layers):
        names.extend(past_names(i))
    return names


def output_names(layout: CacheLayout) -> list[str]:
    names = [LOGITS]
    for i in range(layout.num_layers):
        names.extend(present_names(i))
    return names


def empty_past(layout: CacheLayout, batch: int, length: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Past tensors (key, value per layer, flattened) of ``length`` positions, zeros."""
    past = []
    for _ in range(layout.num_layers):
        past.append(torch.zeros(batch, layout.kv_heads, length, layout.key_dim, dtype=dtype))
        past.append(torch.zeros(batch, layout.kv_heads, length, layout.value_dim, dtype=dtype))
    return past


class FlatDecoder(nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)`` over a causal LM."""

    def __init__(self, model: nn.Module, layout: CacheLayout) -> None:
        super().__init__()
        self.model = model
        self.layout = layout

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.layout.num_layers)]
        cache = DynamicCache(pairs, config=self.model.config)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True,
        )
        present = []
        for layer in out.past_key_values.layers:
            present.extend((layer.keys, layer.values))
        return (out.logits, *present)
