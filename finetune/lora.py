"""LoRA and QLoRA adaptation through peft, on a floating-point or a quantized DeepSeek base.

:func:`apply_lora` wraps a model with peft LoRA adapters on exactly the modules that
:func:`resolve_targets` chooses. Three base kinds take LoRA:

* ``nn.Linear`` (floating-point base): peft's own ``lora.Linear``;
* bitsandbytes ``Linear4bit`` (a ``bnb-nf4`` / ``bnb-fp4`` base, i.e. QLoRA): peft's ``lora.bnb.Linear4bit``;
* dsq's :class:`~dsq.quantize.QuantLinear` (a dsq int4/int8 base): :class:`QuantLinearLora`, registered
  with peft's custom-module mechanism (``LoraConfig._register_custom_module``).

With ``LoraSpec(routed_experts=True)`` the fused routed experts of transformers 5 (3-D parameters
``mlp.experts.gate_up_proj`` / ``down_proj``) are adapted too, through peft ``target_parameters``
(floating-point bases only).

Traps handled (peft 0.21.2, transformers 5.23):

* peft rewrites every ``target_modules`` entry ending in ``gate_proj`` / ``up_proj`` / ``down_proj``
  (fully qualified names included) into ``target_parameters`` of the fused experts for models whose
  type has a transformers v4->v5 conversion (DeepSeek-V2/V3 map to ``qwen2_moe``), so the dense and
  shared-expert MLPs silently get no LoRA and the routed experts get one instead (peft issue #3711).
  While peft injects or loads adapters, :func:`_peft_conversion_disabled` hides the model's type
  from that conversion, and :func:`apply_lora` checks that the adapted set is exactly the requested one.
* peft moves new adapter layers to the device of the base layer's ``weight`` / ``qweight`` or, failing
  those, of its first parameter; a bias-free ``QuantLinear`` has neither (its weight is buffers), so
  during injection each targeted ``QuantLinear`` carries a temporary ``qweight`` attribute (the packed
  buffer) that is removed afterwards.
* bitsandbytes 0.50 on a CPU with AVX512-BF16: a ``Linear4bit``'s first eval forward repacks its weight
  for a bf16 kernel that later training forwards keep using and that has no backward (no gradient
  reaches the layer's input, silently, so every adapter below it trains on a truncated gradient; the
  trainer's periodic evaluations repack again), and a ``state_dict()`` after the repack (peft's
  adapter save, a training checkpoint) leaves plain weights with scrambled scales. A LoRA model's
  4-bit layers therefore run on bitsandbytes' dequantize path (:func:`dsq.quantize.bnb.set_cpu_bf16_kernel_`
  off, after restoring the standard layout), which is what AVX2-only CPUs run anyway.

Example:
    >>> peft_model = apply_lora(model, LoraSpec(r=8, alpha=16))
    >>> trainable, total = trainable_share(peft_model)
    >>> save_adapter(peft_model, Path("out/adapter"), base_identity={"model": "tiny", "quant": "int4 g32"})
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dsq.core.errors import CheckpointError, DsqInputError
from dsq.quantize.bnb import set_cpu_bf16_kernel_
from dsq.quantize.modules import QuantExperts, QuantLinear, QuantTensor, is_fused_experts

if TYPE_CHECKING:  # pragma: no cover
    import peft

ADAPTER_NAME = "default"
MANIFEST_NAME = "adapter_manifest.json"
MANIFEST_VERSION = 1
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

DEFAULT_LEAF_NAMES: tuple[str, ...] = (
    # DeepSeek MLA projections (q_proj when there is no query LoRA, as in V2-Lite)
    "q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
    # Llama / Qwen2 attention
    "k_proj", "v_proj",
    # dense MLP and DeepSeek shared experts
    "gate_proj", "up_proj", "down_proj",
)
"""Leaf names adapted by default (never ``lm_head``, never the router ``mlp.gate``)."""

ROUTED_EXPERT_PARAMS: tuple[str, ...] = ("gate_up_proj", "down_proj")
"""The fused routed-expert parameters adapted when ``routed_experts=True``."""

_ROUTED_EXPERTS_PATH = re.compile(r"(^|\.)experts(\.|$)")


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


# --------------------------------------------------------------------------- imports


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


# --------------------------------------------------------------------------- targets


def adaptable_kind(module: nn.Module) -> str | None:
    """The kind of LoRA layer ``module`` takes: ``"linear"``, ``"bnb-4bit"``, ``"dsq-quant"`` or None.

    Only exact ``nn.Linear`` counts as floating point: subclasses (bitsandbytes' 8-bit layer,
    other quantized Linears) would be wrapped by peft as if their weight were a float matrix.
    """
    if type(module) is nn.Linear:
        return "linear"
    if isinstance(module, QuantLinear):
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
    ``gate/up/down_proj``. Never ``lm_head``, never the router ``mlp.gate``, never anything under
    the routed ``experts`` (see ``LoraSpec.routed_experts``). Module types are not checked here;
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
        if name.rpartition(".")[2] in DEFAULT_LEAF_NAMES and not _ROUTED_EXPERTS_PATH.search(name)
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
    """The exact names that :func:`apply_lora` adapts.

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


# --------------------------------------------------------------------------- the dsq QuantLinear LoRA layer


def quant_linear_lora_class() -> type:
    """Build :class:`QuantLinearLora` (peft is imported lazily, so the class is made on first use)."""
    global QuantLinearLora
    if QuantLinearLora is not None:
        return QuantLinearLora
    import_peft()
    from peft.tuners.lora.layer import LoraLayer

    class _QuantLinearLora(nn.Module, LoraLayer):
        """LoRA on a dsq :class:`QuantLinear`: ``y = QuantLinear(x) + scaling * B(A(dropout(x)))``.

        The quantized base stays frozen; peft's in-place merge is refused (use
        ``dsq.finetune.merge.merge_requantize``, which dequantizes, adds the update and re-quantizes).
        """

        def __init__(
            self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: float = 1, **kwargs: Any
        ) -> None:
            if config.lora_bias or config.use_dora:
                raise ValueError("LoRA on a dsq QuantLinear supports neither lora_bias nor DoRA")
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
            # adapters live where the packed weight lives, in the dtype of its scales (the original weight dtype)
            return base_layer.weight_q.packed.device, base_layer.weight_q.scale.dtype

        def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> None:
            return None

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            raise DsqInputError(
                "cannot merge LoRA in place into a dsq QuantLinear; use dsq.finetune.merge.merge_requantize"
            )

        def unmerge(self) -> None:
            return None  # nothing is ever merged into a QuantLinear

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            a = self.lora_A[adapter].weight  # (r, in)
            b = self.lora_B[adapter].weight  # (out, r)
            return (b @ a) * self.scaling[adapter]  # (out, in)

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self._check_forward_args(x, *args, **kwargs)
            if kwargs.pop("adapter_names", None) is not None:
                raise ValueError("mixed-adapter batches are not supported on a dsq QuantLinear")
            result = self.base_layer(x, *args, **kwargs)  # (..., out)
            if self.disable_adapters:
                return result
            for active in self.active_adapters:
                if active not in self.lora_A.keys():
                    continue
                lora_a, lora_b = self.lora_A[active], self.lora_B[active]
                h = self._cast_input_dtype(x, lora_a.weight.dtype)
                update = lora_b(lora_a(self.lora_dropout[active](h))) * self.scaling[active]  # (..., out)
                result = result + update.to(result.dtype)
            return result

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    _QuantLinearLora.__name__ = _QuantLinearLora.__qualname__ = "QuantLinearLora"
    QuantLinearLora = _QuantLinearLora
    return QuantLinearLora


QuantLinearLora: type | None = None
"""peft LoRA layer class for dsq ``QuantLinear`` (built on first use, when peft is imported)."""


# --------------------------------------------------------------------------- peft workarounds


@contextlib.contextmanager
def _peft_conversion_disabled(model: nn.Module) -> Iterator[None]:
    """Hide the model type from peft's transformers v4->v5 MoE target/state-dict conversion.

    peft 0.21.2 rewrites ``target_modules`` ending in ``gate_proj``/``up_proj``/``down_proj`` into
    fused-expert ``target_parameters`` (and renames adapter keys on load) for model types with a
    registered conversion (DeepSeek -> ``qwen2_moe``). Targets here are exact v5 names, so the
    conversion is wrong for them. The type is shadowed on the config instance and restored on exit.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        yield
        return
    had_own = "model_type" in vars(config)
    previous = vars(config).get("model_type")
    object.__setattr__(config, "model_type", "dsq-lora-exact-targets")
    try:
        yield
    finally:
        if had_own:
            object.__setattr__(config, "model_type", previous)
        else:
            object.__delattr__(config, "model_type")


@contextlib.contextmanager
def _quant_linear_device_hints(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Give each targeted ``QuantLinear`` a temporary ``qweight`` (its packed buffer) while peft injects.

    peft's ``LoraModel._replace_module`` reads the device from ``weight``/``qweight`` or the first
    parameter; a bias-free ``QuantLinear`` has none of them.
    """
    hinted = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, QuantLinear) and not hasattr(module, "qweight"):
            object.__setattr__(module, "qweight", module.weight_q.packed)
            hinted.append(module)
    try:
        yield
    finally:
        for module in hinted:
            object.__delattr__(module, "qweight")


# --------------------------------------------------------------------------- apply / inspect


def _lora_config(spec: LoraSpec, modules: list[str], params: list[str], *, inference_mode: bool = False) -> Any:
    peft = import_peft()
    config = peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(modules),
        target_parameters=list(params) or None,
        bias="none",
        task_type="CAUSAL_LM",
        inference_mode=inference_mode,
    )
    config._register_custom_module({QuantLinear: quant_linear_lora_class()})
    return config


def _base_name(name: str) -> str:
    """A module name inside a peft wrapper, with peft's ``base_layer`` hops removed."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def adapted_modules(peft_model: nn.Module) -> set[str]:
    """Base-model names that carry LoRA.

    Args:
        peft_model: a model returned by :func:`apply_lora` / :func:`load_adapter` (or any peft model).

    Returns:
        Module names (``model.layers.0.self_attn.q_a_proj``) and, for adapted fused experts, parameter
        names (``model.layers.1.mlp.experts.gate_up_proj``), relative to the base model.
    """
    import_peft()
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    found: set[str] = set()
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or not len(module.lora_A):
            continue
        owner = _base_name(name)
        found.add(f"{owner}.{module.parameter_name}" if isinstance(module, ParamWrapper) else owner)
    return found


def _expected_wrapper(kind: str | None) -> type | None:
    """The peft LoRA layer class that must wrap a base module of ``kind``."""
    if kind == "linear":
        from peft.tuners.lora import Linear

        return Linear
    if kind == "bnb-4bit":
        from peft.tuners.lora.bnb import Linear4bit

        return Linear4bit
    if kind == "dsq-quant":
        return quant_linear_lora_class()
    return None


def _verify_wrapped(peft_model: nn.Module, modules: list[str], params: list[str]) -> None:
    """Fail unless exactly ``modules`` + ``params`` carry LoRA, each with the wrapper its base needs,
    and only LoRA parameters require grad."""
    frozen_wrong = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    if frozen_wrong:
        raise LoraTargetError(f"base parameter(s) {frozen_wrong[:5]} still require grad after wrapping")
    requested = set(modules) | set(params)
    got = adapted_modules(peft_model)
    if got != requested:
        missing, extra = sorted(requested - got), sorted(got - requested)
        raise LoraTargetError(
            "peft did not adapt exactly the requested targets: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}"
        )
    base = peft_model.get_base_model()
    for name in modules:
        wrapper = base.get_submodule(name)
        expected = _expected_wrapper(adaptable_kind(wrapper.get_base_layer()))
        if type(wrapper) is not expected:
            raise LoraTargetError(
                f"{name}: peft wrapped a {type(wrapper.get_base_layer()).__name__} with {type(wrapper).__name__}, "
                f"expected {getattr(expected, '__name__', None)}"
            )


def _check_bnb_marked(model: nn.Module, modules: list[str]) -> None:
    if any(adaptable_kind(model.get_submodule(n)) == "bnb-4bit" for n in modules):
        if getattr(model, "is_loaded_in_4bit", False) is not True:
            raise LoraTargetError(
                "the model holds bitsandbytes Linear4bit layers but is not marked is_loaded_in_4bit; quantize it "
                "with dsq.quantize.quantize_(model, BnbNF4Config()) or load it with transformers' BitsAndBytesConfig"
            )


def _wrap(model: nn.Module, spec: LoraSpec, modules: list[str], params: list[str], *, inference_mode: bool = False) -> Any:
    """Wrap ``model`` with LoRA on exactly ``modules`` + ``params`` and check the result."""
    peft = import_peft()
    _check_bnb_marked(model, modules)
    config = _lora_config(spec, modules, params, inference_mode=inference_mode)
    with _peft_conversion_disabled(model), _quant_linear_device_hints(model, modules), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = peft.get_peft_model(model, config)
    try:
        _verify_wrapped(peft_model, modules, params)
    except LoraTargetError:
        peft_model.unload()  # leave the caller's model as it was
        raise
    set_cpu_bf16_kernel_(peft_model, False)  # the repacked CPU kernel has no backward
    return peft_model


def apply_lora(model: nn.Module, spec: LoraSpec) -> "peft.PeftModel":
    """Freeze ``model`` and add LoRA adapters to exactly :func:`resolve_targets` ``(model, spec)``.

    Works on floating-point bases (``nn.Linear``), bitsandbytes 4-bit bases (QLoRA; the model must
    be marked ``is_loaded_in_4bit`` as :func:`dsq.quantize.quantize_` and transformers mark it) and
    dsq-quantized bases (``QuantLinear``). ``B`` starts at zero, so the wrapped model computes
    exactly what the base computes until trained (on a 4-bit base: what it computes on bitsandbytes'
    dequantize path, to which every ``Linear4bit`` is switched).

    Args:
        model: the base causal LM; it is modified in place (peft swaps the target modules).
        spec: rank, alpha, dropout, targets.

    Returns:
        The ``peft.PeftModel``; only LoRA parameters require grad.

    Raises:
        PeftUnavailableError: peft is not installed.
        LoraTargetError: targets cannot be resolved, the model is already adapted, or peft adapted
            another set than requested (the model is unwrapped again before raising).

    Example:
        >>> peft_model = apply_lora(model, LoraSpec(r=4, targets=(r"self_attn\\.o_proj$",)))
        >>> sorted(adapted_modules(peft_model))
        ['model.layers.0.self_attn.o_proj', 'model.layers.1.self_attn.o_proj']
    """
    _refuse_peft_model(model)
    modules, params = _split_targets(model, resolve_targets(model, spec))
    return _wrap(model, spec, modules, params)


def _logical_numel(p: torch.Tensor) -> int:
    """Elements a parameter stands for: a bitsandbytes 4-bit weight counts its unpacked shape."""
    state = getattr(p, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return math.prod(state.shape)
    return p.numel()


def trainable_share(peft_model: nn.Module) -> tuple[int, int]:
    """Trainable and total parameter counts.

    Quantized weights count as the weights they stand for: a dsq ``QuantTensor`` (buffers, not
    parameters) by its logical shape, a bitsandbytes 4-bit weight by its unpacked shape.

    Args:
        peft_model: a LoRA-wrapped model.

    Returns:
        ``(trainable, total)`` element counts.
    """
    trainable = total = 0
    for p in peft_model.parameters():
        n = _logical_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    total += sum(math.prod(m.shape) for m in peft_model.modules() if isinstance(m, QuantTensor))
    return trainable, total


# --------------------------------------------------------------------------- save / load


def _check_identity(base_identity: Any) -> dict:
    if not isinstance(base_identity, dict) or not all(isinstance(k, str) for k in base_identity):
        raise ValueError(f"base_identity must be a dict with string keys, got {base_identity!r}")
    try:
        return json.loads(json.dumps(base_identity))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"base_identity must be JSON-serializable: {exc}") from exc


def _manifest(peft_model: nn.Module, base_identity: dict) -> dict:
    config = peft_model.peft_config[ADAPTER_NAME]
    return {
        "version": MANIFEST_VERSION,
        "base": base_identity,
        "targets": sorted(adapted_modules(peft_model)),
        "r": int(config.r),
        "alpha": float(config.lora_alpha),
        "dropout": float(config.lora_dropout),
        "trainable_params": trainable_share(peft_model)[0],
    }


def _single_adapter(peft_model: nn.Module) -> None:
    peft = import_peft()
    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"expected a peft.PeftModel, got {type(peft_model).__name__}")
    if list(peft_model.peft_config) != [ADAPTER_NAME]:
        raise ValueError(f"expected one adapter named {ADAPTER_NAME!r}, got {list(peft_model.peft_config)}")


def save_adapter(peft_model: "peft.PeftModel", out_dir: Path, base_identity: dict, *, overwrite: bool = False) -> list[Path]:
    """Write the adapter in peft format plus dsq's ``adapter_manifest.json``.

    Everything is written into a temporary sibling directory that is renamed to ``out_dir`` at the
    end, so a failure leaves no partial adapter behind.

    Args:
        peft_model: a model from :func:`apply_lora` / :func:`load_adapter` (one adapter).
        out_dir: directory to create.
        base_identity: what the adapter was trained on (JSON-serializable dict, e.g. checkpoint
            hash and quantization scheme); :func:`load_adapter` compares it.
        overwrite: replace an existing ``out_dir`` (otherwise an existing non-empty one is an error).

    Returns:
        The written files (in ``out_dir``), sorted: ``adapter_config.json``,
        ``adapter_model.safetensors``, ``adapter_manifest.json`` (and peft's README.md).

    Raises:
        FileExistsError: ``out_dir`` exists, is not empty and ``overwrite`` is False.
        CheckpointError: peft wrote pickle weights or no safetensors.
    """
    _single_adapter(peft_model)
    identity = _check_identity(base_identity)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_adapter(peft_model, tmp, identity)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(out_dir / p.name for p in out_dir.iterdir())


def _write_adapter(peft_model: Any, tmp: Path, identity: dict) -> None:
    tmp.mkdir(parents=True)
    peft_model.save_pretrained(str(tmp), safe_serialization=True)
    _check_safetensors_only(tmp)
    manifest = _manifest(peft_model, identity)
    _write_exact_targets(tmp / ADAPTER_CONFIG_NAME, manifest["targets"])
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_exact_targets(config_path: Path, targets: list[str]) -> None:
    """Record the exact module names in ``adapter_config.json``.

    peft shortens 20 or more targets to their common suffixes (``gate_proj`` ...), which on a
    DeepSeek model other readers would map onto the fused experts; the full names are unambiguous.
    """
    config = json.loads(config_path.read_text(encoding="utf-8"))
    params = set(config.get("target_parameters") or [])
    config["target_modules"] = sorted(t for t in targets if t not in params)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``, moving an existing ``out_dir`` aside first."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError:
        if old is not None:
            old.rename(out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_safetensors_only(root: Path) -> None:
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{root} holds pickle adapter files {pickles}; only safetensors are allowed")
    if not (root / ADAPTER_WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{root} has no {ADAPTER_WEIGHTS_NAME}")
    if not (root / ADAPTER_CONFIG_NAME).is_file():
        raise CheckpointError(f"{root} has no {ADAPTER_CONFIG_NAME}")


def read_manifest(adapter_dir: Path) -> dict:
    """Read and validate ``adapter_manifest.json`` (unknown keys are tolerated with a warning).

    Raises:
        CheckpointError: the file is missing, unreadable, of an unsupported version or lacks a field.
    """
    path = Path(adapter_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{adapter_dir} has no {MANIFEST_NAME}; it was not written by dsq.save_adapter") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{path}: unsupported manifest version {version!r} (this dsq reads {MANIFEST_VERSION})")
    required = {"version", "base", "targets", "r", "alpha", "trainable_params"}
    missing = sorted(required - manifest.keys())
    if missing:
        raise CheckpointError(f"{path} lacks field(s) {missing}")
    targets = manifest["targets"]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise CheckpointError(f"{path}: targets must be a non-empty list of names, got {targets!r}")
    unknown = sorted(manifest.keys() - required - {"dropout"})
    if unknown:
        warnings.warn(f"{path}: ignoring unknown manifest key(s) {unknown}", stacklevel=2)
    return manifest


def _check_config_agrees(adapter_dir: Path, manifest: dict) -> None:
    """peft's ``adapter_config.json`` must name the manifest's targets, rank and alpha."""
    path = adapter_dir / ADAPTER_CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    names = set(config.get("target_modules") or []) | set(config.get("target_parameters") or [])
    if names != set(manifest["targets"]):
        raise CheckpointError(f"{path} and {MANIFEST_NAME} name different targets")
    if config.get("r") != manifest["r"] or float(config.get("lora_alpha", math.nan)) != float(manifest["alpha"]):
        raise CheckpointError(f"{path} and {MANIFEST_NAME} give different r / alpha")


def _compare_identity(found: Any, expected: dict, path: Path) -> None:
    """Raise :class:`CheckpointError` naming every field where the adapter's base differs."""
    expected = _check_identity(expected)
    if not isinstance(found, dict):
        raise CheckpointError(f"{path}: base identity is not a mapping: {found!r}")
    absent = object()
    fields = sorted(k for k in found.keys() | expected.keys() if found.get(k, absent) != expected.get(k, absent))
    if fields:
        details = "; ".join(
            f"field {k!r}: adapter has {found.get(k, '<missing>')!r}, expected {expected.get(k, '<missing>')!r}"
            for k in fields
        )
        raise CheckpointError(f"adapter {path.parent} was trained on another base: {details}")


def load_adapter(base_model: nn.Module, adapter_dir: Path, expected_base: dict | None = None) -> "peft.PeftModel":
    """Wrap ``base_model`` with the adapter saved by :func:`save_adapter`.

    The manifest's exact targets are adapted (the same checks as :func:`apply_lora`) and the
    safetensors weights loaded; every LoRA tensor must be present and used.

    Args:
        base_model: the base the adapter was trained on (same modules, same quantization); modified
            in place.
        adapter_dir: directory written by :func:`save_adapter`.
        expected_base: if given, must equal the manifest's base identity.

    Returns:
        The ``peft.PeftModel`` in eval mode, LoRA parameters frozen; its bitsandbytes 4-bit layers on
        the dequantize path, as in :func:`apply_lora`.

    Raises:
        CheckpointError: missing/pickle files, a base identity that differs (naming the field),
            targets that do not match the model, or adapter tensors that do not fit.
    """
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    _check_safetensors_only(adapter_dir)
    manifest = read_manifest(adapter_dir)
    _check_config_agrees(adapter_dir, manifest)
    if expected_base is not None:
        _compare_identity(manifest["base"], expected_base, adapter_dir / MANIFEST_NAME)
    _refuse_peft_model(base_model)
    spec = LoraSpec(r=int(manifest["r"]), alpha=float(manifest["alpha"]), dropout=float(manifest.get("dropout", 0.0)))
    try:
        modules, params = _split_targets(base_model, list(manifest["targets"]))
        _check_adaptable(base_model, modules, f"adapter {adapter_dir}")
        peft_model = _wrap(base_model, spec, modules, params, inference_mode=True)
    except LoraTargetError as exc:
        raise CheckpointError(f"adapter {adapter_dir} does not fit this model: {exc}") from exc
    state = load_file(str(adapter_dir / ADAPTER_WEIGHTS_NAME))
    _set_adapter_state(peft_model, state, adapter_dir)
    return peft_model.eval()


def _set_adapter_state(peft_model: Any, state: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    from peft import set_peft_model_state_dict

    try:
        with _peft_conversion_disabled(peft_model.get_base_model()):
            result = set_peft_model_state_dict(peft_model, state, adapter_name=ADAPTER_NAME)
    except RuntimeError as exc:  # tensor shapes that do not fit the modules
        peft_model.unload()  # leave the caller's model as it was
        raise CheckpointError(f"adapter {adapter_dir} does not fit this model: {exc}") from exc
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        peft_model.unload()
        raise CheckpointError(
            f"adapter {adapter_dir} does not fit this model: missing LoRA tensors {missing[:5]}, "
            f"unexpected tensors {list(result.unexpected_keys)[:5]}"
        )
    for p in peft_model.parameters():
        p.requires_grad_(False)


__all__ = [
    "LoraSpec",
    "LoraTargetError",
    "PeftUnavailableError",
    "adaptable_kind",
    "adapted_modules",
    "apply_lora",
    "default_targets",
    "import_peft",
    "load_adapter",
    "quant_linear_lora_class",
    "read_manifest",
    "resolve_targets",
    "save_adapter",
    "trainable_share",
]
