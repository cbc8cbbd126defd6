"""Round-to-nearest (``quantize.method: rtn``): min/max scales, no calibration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..api import QuantizationReport, apply_weight_quantizer, check_finite
from ..artifact_save import save_quantized_model
from ..cost import EXPERT_BY_EXPERT, MethodCost, integer_layout, no_calibration
from ..method import Method, register
from ..primitives import QuantizedWeight, quantize_rtn, quantize_rtn_slices
from ..scheme import WeightScheme
from ..sections import WeightMethodSection
from ..sequential import RESIDENT, LayerLifecycle
from ..targets import TargetSpec, select_targets

@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest weight-only quantization with min/max scales."""

    scheme: WeightScheme = WeightScheme()
    targets: TargetSpec = TargetSpec()


def _rtn(
    model: nn.Module, config: RTNConfig, calibration: torch.Tensor | None, progress: bool, lifecycle: LayerLifecycle = RESIDENT
) -> QuantizationReport:
    schemes = {d.name: d.scheme_or(config.scheme) for d in select_targets(model, config.targets)}

    def quantizer(name: str, weight: torch.Tensor) -> QuantizedWeight:
        scheme = schemes[name.rpartition(".")[0]]  # name: <linear>.weight or <experts>.<projection>
        if weight.dim() == 3:  # fused experts one by one: fp32 temporaries of one expert, not of all E
            qw = quantize_rtn_slices(weight, scheme)
        else:
            qw = quantize_rtn(weight, scheme)
        check_finite(name, qw)
        return qw

    return apply_weight_quantizer(
        model, config.targets, quantizer, method="rtn", scheme=config.scheme, progress=progress, lifecycle=lifecycle
    )


class RTNSection(WeightMethodSection):
    """``quantize:`` with ``method: rtn``."""

    method: Literal["rtn"] = "rtn"

    def config(self, dtype: torch.dtype = torch.float32) -> RTNConfig:
        return RTNConfig(scheme=self.weights.scheme(), targets=self.targets.spec())


RTN_COST = MethodCost(layout=integer_layout, calibration=no_calibration, rounding=EXPERT_BY_EXPERT)


RTN = register(Method(
    name="rtn", cost=RTN_COST, section=RTNSection, config=RTNConfig, handler=_rtn, save=save_quantized_model,
    streams=True, exports=True, qat_start=True, lora_base=True, mixed_schemes=True,
))