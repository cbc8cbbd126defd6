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
  While peft injects or loads adapters, :func:`~dsq.finetune.lora_peft._peft_conversion_disabled`
  hides the model's type from that conversion, and :func:`apply_lora` checks that the adapted set is
  exactly the requested one.
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

from typing import TYPE_CHECKING

from torch import nn

from .lora_adapter import ADAPTER_NAME, load_adapter, read_manifest, save_adapter
from .lora_peft import _wrap, adapted_modules, trainable_share
from .lora_quant import quant_linear_lora_class
from .lora_targets import (
    DEFAULT_LEAF_NAMES,
    ROUTED_EXPERT_PARAMS,
    LoraSpec,
    LoraTargetError,
    PeftUnavailableError,
    _refuse_peft_model,
    _split_targets,
    adaptable_kind,
    default_targets,
    import_peft,
    resolve_targets,
)

if TYPE_CHECKING:  # pragma: no cover
    import peft


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


__all__ = [
    "ADAPTER_NAME",
    "DEFAULT_LEAF_NAMES",
    "ROUTED_EXPERT_PARAMS",
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
