"""LoRA on dsq's :class:`~dsq.quantize.QuantLinear`: the peft layer class and its injection hint.

peft knows nothing of dsq's packed int4/int8 layers; :func:`quant_linear_lora_class` builds the
layer that peft's custom-module mechanism (``LoraConfig._register_custom_module``) puts around each
targeted ``QuantLinear``. The class derives from peft's ``LoraLayer``, so it is made on first use,
when peft is imported.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dsq.core.errors import DsqInputError
from dsq.quantize.modules import QuantLinear

from .lora_targets import import_peft


class _QuantLinearLoraLayer(nn.Module):
    """The methods of :class:`QuantLinearLora`, which puts peft's ``LoraLayer`` after them (and after
    ``nn.Module``) in its method resolution order."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: float = 1, **kwargs: Any
    ) -> None:
        from peft.tuners.lora.layer import LoraLayer

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


def quant_linear_lora_class() -> type:
    """Build :class:`QuantLinearLora` (peft is imported lazily, so the class is made on first use)."""
    global QuantLinearLora
    if QuantLinearLora is not None:
        return QuantLinearLora
    import_peft()
    from peft.tuners.lora.layer import LoraLayer

    class _QuantLinearLora(_QuantLinearLoraLayer, LoraLayer):
        """LoRA on a dsq :class:`QuantLinear`: ``y = QuantLinear(x) + scaling * B(A(dropout(x)))``.

        The quantized base stays frozen; peft's in-place merge is refused (use
        ``dsq.finetune.merge.merge_requantize``, which dequantizes, adds the update and re-quantizes).
        """

    _QuantLinearLora.__name__ = _QuantLinearLora.__qualname__ = "QuantLinearLora"
    QuantLinearLora = _QuantLinearLora
    return QuantLinearLora


QuantLinearLora: type | None = None
"""peft LoRA layer class for dsq ``QuantLinear`` (built on first use, when peft is imported)."""


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
