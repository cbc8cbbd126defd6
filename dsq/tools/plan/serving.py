"""Serving memory: the weights plus the KV cache of one sequence (batch 1) at 4k, 32k and 128k tokens.

The cache per token follows :func:`dsq.quantize.kv_cache.kv_layout` (the same formula as the report's
serving-memory table, :func:`dsq.eval.memory.serving_memory`): ``layers x kv_heads x (k_dim + v_dim)``
elements for Llama and Qwen2, ``layers x (kv_lora_rank + qk_rope_head_dim)`` for MLA (plus DeepSeek-V3.2's
indexer key in the model dtype), one byte each for an int8 / FP8 KV cache, the recipe dtype otherwise.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dsq.eval.memory import SERVING_CONTEXTS
from dsq.quantize.kv_cache import KVCacheScheme, KVLayout, kv_layout, unsupported_reason


@dataclass(frozen=True)
class ServingRow:
    """One way to serve the model.

    Attributes:
        label: which weights (``source``, ``recipe: gptq``).
        kv_cache: what the cache stores (``bfloat16 KV cache``, ``int8 per-tensor KV cache``).
        weight_bytes: the weights' tensor bytes.
        kv_bytes_per_token: cache bytes per token, all layers.
        contexts: ``(tokens, kv cache bytes, total bytes)`` at each of :data:`SERVING_CONTEXTS`.
    """

    label: str
    kv_cache: str
    weight_bytes: int
    kv_bytes_per_token: int
    contexts: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class ServingPlan:
    """The serving rows of a plan, and what each layer caches per token."""

    layout: str
    rows: tuple[ServingRow, ...]


def _row(label: str, layout: KVLayout, weight_bytes: int, scheme: KVCacheScheme | None, dtype_name: str,
         dtype_bytes: int) -> ServingRow:
    kv_bytes = scheme.bytes_per_element if scheme is not None else dtype_bytes
    per_token = layout.bytes_per_token(kv_bytes, dtype_bytes)
    name = scheme.describe() if scheme is not None else f"{dtype_name} KV cache"
    points = tuple((c, c * per_token, weight_bytes + c * per_token) for c in SERVING_CONTEXTS)
    return ServingRow(label, name, weight_bytes, per_token, points)


def serving_plan(config: Mapping[str, Any], source: tuple[str, int], recipe: tuple[str, int], kv: KVCacheScheme | None,
                 dtype_name: str, dtype_bytes: int) -> tuple[ServingPlan | None, str | None]:
    """The serving rows: the source weights with a cache in the recipe dtype, the recipe's artifact with the
    recipe's KV cache, and (when the recipe quantizes no KV cache) the artifact with an int8 KV cache.

    Args:
        config: the checkpoint's config.json.
        source: ``(label, tensor bytes)`` of the source weights.
        recipe: ``(label, tensor bytes)`` of the recipe's artifact.
        kv: the recipe's KV-cache scheme (None: none).
        dtype_name: the recipe dtype.
        dtype_bytes: its bytes per element.

    Returns:
        ``(plan, None)``, or ``(None, why)`` for an architecture whose cache is not modelled.
    """
    reason = unsupported_reason(config.get("model_type"))
    if reason is not None:
        refused = "; `dsq run` refuses the recipe's kv_cache section on it" if kv is not None else ""
        return None, f"serving memory (weights + KV cache) is not estimated for {config.get('model_type')}: {reason}{refused}"
    layout = kv_layout(config)
    rows = [_row(source[0], layout, source[1], None, dtype_name, dtype_bytes),
            _row(recipe[0], layout, recipe[1], kv, dtype_name, dtype_bytes)]
    if kv is None:
        rows.append(_row(f"{recipe[0]} + kv_cache: int8", layout, recipe[1], KVCacheScheme(), dtype_name, dtype_bytes))
    return ServingPlan(layout.describe(), tuple(rows)), None
