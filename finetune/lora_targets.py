"""What LoRA adapts: the spec, the import of peft, and the exact target names.

:func:`resolve_targets` turns a :class:`LoraSpec` into the exact module names (and, with
``routed_experts``, the fused expert parameter names) that :func:`dsq.finetune.lora.apply_lora`
adapts. Only modules that LoRA can wrap are accepted: ``nn.Linear``, bitsandbytes ``Linear4bit`` and
dsq's :class:`~dsq.quantize.QuantLinear` (see :func:`adaptable_kind`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from dsq.core.errors import DsqInputError
from dsq.quantize.modules import QuantExperts, QuantLinear, QuantTensor, is_fused_experts

DEFAULT_LEAF_NAMES: tuple[str, ...] = (
    # DeepSeek MLA projections (q_proj when there is no query LoRA, as in V2-Lite)
    "q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
    # Llama / Qwen2 attention
    "k_proj", "v_proj",
    # DeepSeek-V4 attention: the shared key/value projection and the second output projection (the grouped
    # o_a_proj applies each group's rows to its own input, which a LoRA update of the whole matrix would not)
    "kv_proj", "o_b_proj",
    # dense MLP and DeepSeek shared experts
    "gate_proj", "up_proj", "down_proj",
)
"""Leaf names adapted by default (never ``lm_head``, never the router ``mlp.gate``, nothing under the routed
experts, DeepSeek-V4's KV compressors or the DSA indexers of V3.2/V4: see :func:`default_targets`)."""

ROUTED_EXPERT_PARAMS: tuple[str, ...] = ("gate_up_proj", "down_proj")
"""The fused routed-expert parameters adapted when ``routed_experts=True``."""

_NOT_BY_DEFAULT_PATH = re.compile(r"(^|\.)(experts|compressor|indexer)(\.|$)")  # routed experts, V4 compressors, DSA indexers


class PeftUnavailableError(DsqInputError, ImportError):
    """peft cannot be imported."""


class LoraTargetError(DsqInputError, ValueError):
    """LoRA targets cannot be resolved or were not adapted as requested."""


@dataclass(frozen=True)
class LoraSpec:
    """What LoRA adapts and how.

    Args:
        r: adapter rank (integer >= 1).
        alpha: LoRA alpha; the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter input, in ``[0, 1)``.
        targets: regular expressions searched (``re.search``) in full module names; ``None`` takes
            :func:`default_targets`.
        routed_experts: also adapt DeepSeek's fused routed experts (peft ``target_parameters``);
            floating-point bases only.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None
    routed_experts: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive finite number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.routed_experts, bool):
            raise ValueError(f"routed_experts must be True or False, got {self.routed_experts!r}")
        if self.targets is not None:
            self._check_targets()

    def _check_targets(self) -> None:
        if isinstance(self.targets, str) or not isinstance(self.targets, (tuple, list)):
            raise ValueError(f"targets must be a tuple of regular expressions or None, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise ValueError("targets must not be empty; use None for the default targets")
        for pattern in self.targets:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"every LoRA target must be a non-empty regular expression, got {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid LoRA target pattern {pattern!r}: {exc}") from exc

    @property
    def scaling(self) -> float:
        """``alpha / r``, the factor peft applies to ``B @ A``."""
        return float(self.alpha) / self.r


def import_peft() -> Any:
    """Import peft, or raise :class:`PeftUnavailableError` saying how to install it."""
    try:
        import peft
    except Exception as exc:  # ImportError, or an error inside peft's own imports
        raise PeftUnavailableError(
            "LoRA needs peft>=0.17, which could not be imported "
            f"({type(exc).__name__}: {exc}); install it with `pip install 'dsq[lora]'` or `pip install peft`"
        ) from exc
    return peft


def _bnb_layer_types() -> tuple[type, ...]:
    """bitsandbytes' ``(Linear4bit, Linear8bitLt)``, or ``()`` when bitsandbytes is not importable."""
    try:
        import bitsandbytes as bnb
    except Exception:  # no bitsandbytes: no model can hold its layers either
        return ()
    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def adaptable_kind(module: nn.Module) -> str | None:
    """The kind of LoRA layer ``module`` takes: ``"linear"``, ``"bnb-4bit"``, ``"dsq-quant"`` or None.

    Only exact ``nn.Linear`` counts as floating point: subclasses (bitsandbytes' 8-bit layer,
    other quantized Linears) would be wrapped by peft as if their weight were a float matrix.
    """
    if type(module) is nn.Linear:
        return "linear"
    if isinstance(module, QuantLinear) and module.n_groups is None:  # a grouped one is not one matrix product
        return "dsq-quant"
    bnb_types = _bnb_layer_types()
    if bnb_types and isinstance(module, bnb_types[0]):
        return "bnb-4bit"
    return None


def _is_quantized_module(module: nn.Module) -> bool:
    """dsq or bitsandbytes quantized storage (4-bit or 8-bit)."""
    return isinstance(module, (QuantLinear, QuantExperts, QuantTensor) + _bnb_layer_types())


def _owns_tensors(module: nn.Module) -> bool:
    """Whether ``module`` holds parameters or buffers itself (not only through children)."""
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _refuse_peft_model(model: nn.Module) -> None:
    peft = import_peft()
    if isinstance(model, peft.PeftModel):
        raise LoraTargetError("the model is already a PeftModel; pass the base model (peft_model.get_base_model())")
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            raise LoraTargetError(f"{name} already carries a peft adapter; pass an unadapted base model")


def default_targets(model: nn.Module) -> list[str]:
    """Full names of the modules adapted by default.

    DeepSeek MLA projections (``q_a_proj``, ``q_b_proj`` or ``q_proj``, ``kv_a_proj_with_mqa``,
    ``kv_b_proj``, ``o_proj``), Llama/Qwen2 ``q/k/v/o_proj``, and the dense-MLP and shared-expert
    ``gate/up/down_proj``, DeepSeek-V4's ``q_a_proj``, ``q_b_proj``, ``kv_proj`` and ``o_b_proj``. Never
    ``lm_head``, never the router ``mlp.gate``, never anything under the routed ``experts`` (see
    ``LoraSpec.routed_experts``), DeepSeek-V4's KV ``compressor`` or a DSA ``indexer`` (V3.2, V4: they pick
    which tokens are attended to), nor V4's grouped ``o_a_proj``. Module types are not checked here;
    :func:`resolve_targets` refuses those that cannot take LoRA.

    Args:
        model: a causal LM (floating point or quantized).

    Returns:
        Full module names, in module order.

    Raises:
        LoraTargetError: no module has one of :data:`DEFAULT_LEAF_NAMES`.
    """
    names = [
        name
        for name, _ in model.named_modules()
        if name.rpartition(".")[2] in DEFAULT_LEAF_NAMES and not _NOT_BY_DEFAULT_PATH.search(name)
    ]
    if not names:
        raise LoraTargetError(
            f"{type(model).__name__} has no module named like {', '.join(DEFAULT_LEAF_NAMES)}; "
            "give LoraSpec(targets=...) explicitly"
        )
    return names


def _describe(name: str, module: nn.Module) -> str:
    return f"{name} ({type(module).__name__})"


def _check_adaptable(model: nn.Module, names: list[str], origin: str) -> None:
    bad = [_describe(n, model.get_submodule(n)) for n in names if adaptable_kind(model.get_submodule(n)) is None]
    if bad:
        raise LoraTargetError(
            f"{origin} selects module(s) that cannot take LoRA: {', '.join(bad[:5])}"
            + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            + "; LoRA takes nn.Linear, bitsandbytes Linear4bit and dsq QuantLinear"
        )


def _pattern_matches(model: nn.Module, pattern: str) -> list[str]:
    """Adaptable modules matched by ``pattern``; errors for a pattern that matches nothing usable."""
    matched = [(n, m) for n, m in model.named_modules() if n and re.search(pattern, n)]
    if not matched:
        raise LoraTargetError(f"LoRA target pattern {pattern!r} matches no module of {type(model).__name__}")
    adaptable = [n for n, m in matched if adaptable_kind(m) is not None]
    # modules holding weights of their own that LoRA cannot wrap (router, fused experts, norms, 8-bit layers)
    refused = [(n, m) for n, m in matched if adaptable_kind(m) is None and _owns_tensors(m)]
    if refused or not adaptable:
        shown = refused or matched
        hint = ""
        if any(is_fused_experts(m) or isinstance(m, QuantExperts) for _, m in shown):
            hint = "; routed experts are adapted with LoraSpec(routed_experts=True), not by pattern"
        raise LoraTargetError(
            f"LoRA target pattern {pattern!r} matches module(s) that cannot take LoRA: "
            f"{', '.join(_describe(n, m) for n, m in shown[:5])}"
            + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")
            + f" (LoRA takes nn.Linear, bitsandbytes Linear4bit and dsq QuantLinear){hint}"
        )
    return adaptable


def _routed_expert_params(model: nn.Module) -> list[str]:
    """``<experts>.gate_up_proj`` / ``<experts>.down_proj`` of every fused experts module (FP base only)."""
    quantized = [n for n, m in model.named_modules() if _is_quantized_module(m)]
    if quantized:
        raise LoraTargetError(
            "routed_experts=True adapts the fused expert parameters through peft target_parameters, which needs a "
            f"floating-point base; this model has quantized modules (e.g. {quantized[0]}). Adapt the experts on the "
            "floating-point model, merge, then quantize"
        )
    experts = [n for n, m in model.named_modules() if is_fused_experts(m)]
    if not experts:
        raise LoraTargetError(f"routed_experts=True but {type(model).__name__} has no fused routed experts")
    return [f"{n}.{p}" for n in experts for p in ROUTED_EXPERT_PARAMS]


def resolve_targets(model: nn.Module, spec: LoraSpec) -> list[str]:
    """The exact names that :func:`dsq.finetune.lora.apply_lora` adapts.

    Args:
        model: the base model (not yet wrapped by peft).
        spec: the LoRA spec; with ``spec.targets`` None, :func:`default_targets` is used.

    Returns:
        Sorted full module names; with ``spec.routed_experts`` also the fused expert parameter
        names (``...mlp.experts.gate_up_proj``, ``...mlp.experts.down_proj``).

    Raises:
        LoraTargetError: a pattern matches no module, or matches (or the defaults select) a module
            type that cannot take LoRA (naming the pattern and the modules); ``routed_experts`` on a
            quantized base or on a model without fused experts.
    """
    if spec.targets is None:
        names = default_targets(model)
        _check_adaptable(model, names, "the default LoRA targets")
    else:
        names = [n for pattern in spec.targets for n in _pattern_matches(model, pattern)]
    chosen = set(names)
    if spec.routed_experts:
        chosen |= set(_routed_expert_params(model))
    return sorted(chosen)


def _submodule_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name) if name else None
    except AttributeError:
        return None


def _split_targets(model: nn.Module, targets: list[str]) -> tuple[list[str], list[str]]:
    """(module names, fused-expert parameter names) of a resolved target list."""
    modules, params = [], []
    for name in targets:
        owner, _, leaf = name.rpartition(".")
        if _submodule_or_none(model, name) is not None:
            modules.append(name)
        elif leaf in ROUTED_EXPERT_PARAMS and is_fused_experts(_submodule_or_none(model, owner) or nn.Module()):
            params.append(name)
        else:
            raise LoraTargetError(f"LoRA target {name!r} is neither a module nor a fused expert parameter of the model")
    return modules, params
