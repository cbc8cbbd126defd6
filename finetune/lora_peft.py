"""The peft wrapper around a base model: building it on exact targets, checking it, counting it.

Traps handled (peft 0.21.2, transformers 5.23):

* peft rewrites every ``target_modules`` entry ending in ``gate_proj`` / ``up_proj`` / ``down_proj``
  (fully qualified names included) into ``target_parameters`` of the fused experts for models whose
  type has a transformers v4->v5 conversion (DeepSeek-V2/V3 map to ``qwen2_moe``), so the dense and
  shared-expert MLPs silently get no LoRA and the routed experts get one instead (peft issue #3711).
  While peft injects or loads adapters, :func:`_peft_conversion_disabled` hides the model's type
  from that conversion, and :func:`_wrap` checks that the adapted set is exactly the requested one.
* bitsandbytes 0.50 on a CPU with AVX512-BF16: a ``Linear4bit``'s repacked bf16 kernel has no
  backward, so :func:`_wrap` switches every 4-bit layer of the wrapped model to bitsandbytes'
  dequantize path (see :mod:`dsq.finetune.lora`).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dsq.quantize.bnb import set_cpu_bf16_kernel_
from dsq.quantize.modules import QuantLinear, QuantTensor

from .lora_quant import _quant_linear_device_hints, quant_linear_lora_class
from .lora_targets import LoraSpec, LoraTargetError, adaptable_kind, import_peft


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
        peft_model: a model returned by :func:`dsq.finetune.lora.apply_lora` /
            :func:`dsq.finetune.lora.load_adapter` (or any peft model).

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

