"""Which modules get quantized: the DeepSeek-aware table of module patterns.

Quantizable modules are every ``nn.Linear`` and every fused MoE experts module. The router
(``mlp.gate``: a Linear in some architectures, a custom module in DeepSeek-V3), norms and
embeddings always stay in high precision; ``lm_head`` is kept unless asked for.
Patterns are regular expressions matched with ``re.search`` against the module's full name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .modules import is_fused_experts

# Kept in high precision whatever the include patterns say: the MoE router (``mlp.gate``,
# a Linear in some architectures; DeepSeek-V3's also holds ``e_score_correction_bias``).
ROUTER = r"(^|\.)gate$"
LM_HEAD = r"(^|\.)lm_head$"
INDEXER = r"(^|\.)indexer\."  # DeepSeek-V3.2 / V4 DSA lightning indexer (V3.2: self_attn.indexer, V4: compressor.indexer)


@dataclass(frozen=True)
class TargetSpec:
    """Include/exclude patterns (``re.search`` on module names) and the lm_head switch.

    Args:
        include: a module must match one of these to be quantized (default: everything).
        exclude: a module matching any of these is kept.
        lm_head: quantize the output projection too (default False: kept).
        indexer: quantize the projections of DeepSeek-V3.2 / V4's DSA lightning indexer too (default False:
            kept; it picks the tokens each query attends to, and quantizing it measurably costs accuracy for
            a tiny share of the weights, see the README).
    """

    include: tuple[str, ...] = (r".*",)
    exclude: tuple[str, ...] = ()
    lm_head: bool = False
    indexer: bool = False

    def __post_init__(self) -> None:
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid module pattern {pattern!r}: {exc}") from exc


@dataclass(frozen=True)
class TargetDecision:
    name: str
    module: nn.Module = field(repr=False)
    kind: str  # "linear" | "experts" — what the module is, not a mode
    quantize: bool
    reason: str


def quantizable_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if is_fused_experts(module):
        return "experts"
    return None


def decide(name: str, kind: str, spec: TargetSpec) -> tuple[bool, str]:
    """Whether module ``name`` is quantized under ``spec``, and why."""
    if re.search(ROUTER, name):
        return False, "router (kept in high precision)"
    if re.search(LM_HEAD, name) and not spec.lm_head:
        return False, "lm_head (kept; set lm_head: true to quantize)"
    if re.search(INDEXER, name) and not spec.indexer:
        return False, "DSA indexer (kept; set indexer: true to quantize)"
    if not any(re.search(p, name) for p in spec.include):
        return False, "not matched by include patterns"
    for pattern in spec.exclude:
        if re.search(pattern, name):
            return False, f"excluded by pattern {pattern!r}"
    return True, "quantized"


def select_targets(model: nn.Module, spec: TargetSpec) -> list[TargetDecision]:
    """Every quantizable module of ``model`` with the decision for it, in module order."""
    decisions = []
    for name, module in model.named_modules():
        kind = quantizable_kind(module)
        if kind is None:
            continue
        quantize, reason = decide(name, kind, spec)
        decisions.append(TargetDecision(name, module, kind, quantize, reason))
    return decisions
