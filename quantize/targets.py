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
from .scheme import WeightScheme

# Kept in high precision whatever the include patterns say: the MoE router (``mlp.gate``,
# a Linear in some architectures; DeepSeek-V3's also holds ``e_score_correction_bias``).
ROUTER = r"(^|\.)gate$"
LM_HEAD = r"(^|\.)lm_head$"
INDEXER = r"(^|\.)indexer\."  # DeepSeek-V3.2 / V4 DSA lightning indexer (V3.2: self_attn.indexer, V4: compressor.indexer)


@dataclass(frozen=True)
class SchemeRule:
    """Modules whose name matches ``pattern`` (``re.search``) get ``scheme`` instead of the method's;
    ``scheme=None`` keeps them in the model dtype."""

    pattern: str
    scheme: WeightScheme | None


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
        schemes: per-module schemes (mixed precision): the first :class:`SchemeRule` whose pattern matches a
            selected module gives its scheme (or keeps it); modules no rule matches get the method's scheme.
    """

    include: tuple[str, ...] = (r".*",)
    exclude: tuple[str, ...] = ()
    lm_head: bool = False
    indexer: bool = False
    schemes: tuple[SchemeRule, ...] = ()

    def __post_init__(self) -> None:
        for pattern in (*self.include, *self.exclude, *(rule.pattern for rule in self.schemes)):
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
    scheme: WeightScheme | None = None  # a scheme rule's scheme; None: the method's own

    def scheme_or(self, default: WeightScheme) -> WeightScheme:
        """The scheme this module is quantized with when the method's is ``default``."""
        return self.scheme if self.scheme is not None else default


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
    rule = scheme_rule(name, spec)
    if rule is not None and rule.scheme is None:
        return False, f"kept by scheme rule {rule.pattern!r}"
    return True, "quantized"


def scheme_rule(name: str, spec: TargetSpec) -> SchemeRule | None:
    """The first of ``spec.schemes`` whose pattern matches module ``name`` (None: the method's scheme)."""
    return next((rule for rule in spec.schemes if re.search(rule.pattern, name)), None)


def select_targets(model: nn.Module, spec: TargetSpec) -> list[TargetDecision]:
    """Every quantizable module of ``model`` with the decision for it, in module order."""
    decisions = []
    for name, module in model.named_modules():
        kind = quantizable_kind(module)
        if kind is None:
            continue
        quantize, reason = decide(name, kind, spec)
        rule = scheme_rule(name, spec) if quantize else None
        decisions.append(TargetDecision(name, module, kind, quantize, reason, rule.scheme if rule is not None else None))
    return decisions
