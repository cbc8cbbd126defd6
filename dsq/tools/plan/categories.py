"""Parameter categories of a saved tensor, from its name, and the exact counts per category."""
from __future__ import annotations

import re
from dataclasses import dataclass

ATTENTION = "attention Linears"
DENSE_MLP = "dense MLP Linears"
SHARED_EXPERTS = "shared-expert Linears"
ROUTED_EXPERTS = "routed experts (fused)"
ROUTER = "router"
NORMS = "norms"
EMBEDDINGS = "embeddings"
LM_HEAD = "lm_head"
OTHER = "other"
CATEGORIES: tuple[str, ...] = (ATTENTION, DENSE_MLP, SHARED_EXPERTS, ROUTED_EXPERTS, ROUTER, NORMS, EMBEDDINGS, LM_HEAD, OTHER)
"""Parameter categories, in display order."""


@dataclass(frozen=True)
class ParameterCounts:
    """Exact parameter counts of the model transformers builds from the config.

    Attributes:
        total: every parameter (tied tensors once), as ``sum(p.numel() for p in model.parameters())``.
        by_category: ``(category, parameters)`` in :data:`CATEGORIES` order, empty categories left out.
        buffers: elements of persistent buffers saved with the weights (e.g. the router's
            ``e_score_correction_bias``, DeepSeek-V4's hash-routing table ``tid2eid``); not parameters.
        integer_buffers: those of them that are integer tables (``tid2eid``).
        tied_embeddings: lm_head shares the input embedding (stored once).
    """

    total: int
    by_category: tuple[tuple[str, int], ...]
    buffers: int
    tied_embeddings: bool
    integer_buffers: int = 0


def is_router(module_name: str) -> bool:
    """The MoE router (``mlp.gate``), which dsq never quantizes."""
    from dsq.quantize.targets import ROUTER as ROUTER_PATTERN

    return re.search(ROUTER_PATTERN, module_name) is not None


def category(name: str, expert_modules: set[str], linear_modules: set[str]) -> str:
    """The category of a saved tensor.

    Args:
        name: the tensor's name in the model's state dict.
        expert_modules: names of the fused experts modules.
        linear_modules: names of the ``nn.Linear`` modules: only their tensors count as Linears (DeepSeek-V4's
            attention sinks and compressor position biases sit under ``self_attn`` and are :data:`OTHER`).

    Returns:
        One of :data:`CATEGORIES`.
    """
    owner = name.rpartition(".")[0]
    if "embed_tokens" in name:
        return EMBEDDINGS
    if name.startswith("lm_head"):
        return LM_HEAD
    if owner.rpartition(".")[2].endswith("norm"):
        return NORMS
    if is_router(owner):
        return ROUTER
    if owner in expert_modules:
        return ROUTED_EXPERTS
    if owner not in linear_modules:
        return OTHER
    if ".shared_experts." in name:
        return SHARED_EXPERTS
    if ".self_attn." in name:
        return ATTENTION
    if ".mlp." in name:
        return DENSE_MLP
    return OTHER
