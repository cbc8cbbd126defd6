"""W8A8 (``quantize.method: w8a8``): INT8 weights and activations, optionally smoothed first (SmoothQuant)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import Field
from torch import nn

from dsq.core.errors import QuantizationError
from dsq.core.ranks import current_ranks
from dsq.core.schema import Strict

from ..api import QuantizationReport, require_resident
from ..artifact_save import save_quantized_model
from ..calibrated import _collect, _in_layer, require_calibration
from ..mappings import balance_weight, fold, input_key, resolve, without_balance, without_balance_notes
from ..cost import EXPERT_BY_EXPERT, ActivationRanges, Int8Weights, MethodCost
from ..method import Method, register
from ..sections import CalibrationSection, MethodSection
from ..sequential import RESIDENT, ExpertTokenCounts, LayerLifecycle, decoder_layers, sequential_calibrate
from ..smoothquant import smoothing_factors
from ..stats import StatsCollector
from ..targets import TargetSpec, select_targets
from ..w8a8 import ActivationScheme, DynamicPerTensor, DynamicPerToken, StaticPerTensor, quantize_w8a8_

# transformers' compressed-tensors forward quantizes activations with absmax/127.5 in fp32 where dsq
# runs an integer matmul with absmax/127: each module agrees to ~1e-2 and single int8 steps of later
# activations can flip, so W8A8 artifacts are compared at a looser logit tolerance (said in the report).
W8A8_RELOAD_TOLERANCE = 5e-2

@dataclass(frozen=True)
class W8A8Config:
    """INT8 weights (per-channel, symmetric) and INT8 activations, optionally smoothed first.

    Args:
        activations: ``DynamicPerToken()`` (scale per token at run time), ``DynamicPerTensor()`` (one asymmetric
            scale and zero point per input tensor at run time) or ``StaticPerTensor()`` (one calibrated scale per
            module input; per expert for fused experts).
        smoothquant_alpha: SmoothQuant migration strength (arXiv:2211.10438 eq. 4); ``None``: no smoothing.
        targets: which modules.
        batch_size: calibration sequences per forward.
    """

    activations: ActivationScheme = DynamicPerToken()
    smoothquant_alpha: float | None = 0.5
    targets: TargetSpec = TargetSpec()
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.smoothquant_alpha is not None and not 0 <= self.smoothquant_alpha <= 1:
            raise ValueError(f"smoothquant_alpha must be in [0, 1] or None, got {self.smoothquant_alpha}")

    @property
    def needs_calibration(self) -> bool:
        return self.smoothquant_alpha is not None or isinstance(self.activations, StaticPerTensor)


def _smooth_layer(config: W8A8Config, prefix: str, layer: nn.Module, collector: StatsCollector, quantized: set[str], log: dict) -> None:
    """Fold SmoothQuant factors into every balance mapping of ``layer`` whose layers are quantized."""
    alpha = config.smoothquant_alpha
    for m in resolve(layer):
        if m.per_expert:
            experts = layer.get_submodule(m.smooth)
            name = f"{prefix}.{m.smooth}"
            if name not in quantized:
                continue
            s = torch.stack([
                smoothing_factors(collector[f"{name}.down_proj.{e}"].abs_max, [experts.down_proj[e]], alpha)
                for e in range(experts.down_proj.shape[0])
            ])
        else:
            targets = [b for b in m.balance if f"{prefix}.{b}" in quantized]
            if not targets:
                continue
            weights = [balance_weight(layer.get_submodule(b)) for b in targets]
            s = smoothing_factors(collector[input_key(prefix, m)].abs_max, weights, alpha)
        fold(layer, m, s)
        log[f"{prefix}.{m.smooth}"] = {"smoothquant_balances": list(m.balance), "s_min": float(s.min()), "s_max": float(s.max())}


def _w8a8(
    model: nn.Module, config: W8A8Config, calibration: torch.Tensor | None, progress: bool, lifecycle: LayerLifecycle = RESIDENT
) -> QuantizationReport:
    require_resident(lifecycle, "w8a8")
    if not config.needs_calibration:
        return quantize_w8a8_(model, config.targets, config.activations, progress=progress)
    ids = require_calibration(calibration, "w8a8")
    decisions = select_targets(model, config.targets)
    quantized = {d.name for d in decisions if d.quantize}
    absmax: dict[str, torch.Tensor] = {}
    counts = ExpertTokenCounts()
    smoothing: dict[str, dict] = {}
    missing: dict[str, str] = {}  # module -> why SmoothQuant gave it no scale
    ranks = current_ranks()  # several processes: each observes its share of the batches; maxima are combined

    def on_layer(prefix: str, layer: nn.Module, forward: Callable) -> None:
        linears = {d.name: d.module for d in _in_layer(decisions, prefix) if d.kind == "linear"}
        layer_counts = counts  # routed tokens are counted on the first pass only
        if config.smoothquant_alpha is not None:
            # unrouted_weight 0: an expert's statistics are over the tokens routed to it
            collector = _collect(layer, prefix, forward, linears, StatsCollector(unrouted_weight=0.0), layer_counts).reduce(ranks)
            _smooth_layer(config, prefix, layer, collector, quantized, smoothing)
            missing.update(without_balance(prefix, layer, quantized))
            layer_counts = ExpertTokenCounts()
        if not isinstance(config.activations, StaticPerTensor):
            return
        collector = _collect(layer, prefix, forward, linears, StatsCollector(unrouted_weight=0.0), layer_counts).reduce(ranks)
        for d in _in_layer(decisions, prefix):
            if d.kind == "linear":
                absmax[d.name] = collector[d.name].abs_max.max()
            else:
                E = d.module.gate_up_proj.shape[0]
                absmax[f"{d.name}.gate_up_proj"] = torch.stack([collector[f"{d.name}.gate_up_proj.{e}"].abs_max.max() for e in range(E)])
                absmax[f"{d.name}.down_proj"] = torch.stack([collector[f"{d.name}.down_proj.{e}"].abs_max.max() for e in range(E)])

    sequential_calibrate(model, ids, on_layer, batch_size=config.batch_size, progress=progress, ranks=ranks)
    counts.reduce(ranks)
    layers_prefix = decoder_layers(model)[0] + "."
    head = [d for d in decisions if d.quantize and not d.name.startswith(layers_prefix)]
    if head and isinstance(config.activations, StaticPerTensor):
        raise QuantizationError(
            f"static W8A8 calibrates inputs inside the decoder layers only; {', '.join(d.name for d in head)} "
            "would get no activation scale (use dynamic activations or exclude it)"
        )
    report = quantize_w8a8_(model, config.targets, config.activations, absmax, progress=progress)
    samples, seq_len = ids.shape
    starved = counts.starved()
    report.calibration = {
        "samples": samples, "seq_len": seq_len, "tokens": samples * seq_len,
        "expert_routed_tokens": counts.counts,
        "experts_without_routed_tokens": starved,
        "smoothquant_alpha": config.smoothquant_alpha,
        "modules": smoothing,
        "without_balance": missing,
    }
    report.notes += without_balance_notes("w8a8 smoothquant", missing, decoder_layers(model)[0])
    for name, experts in starved.items():
        report.notes.append(
            f"{name}: expert(s) {experts} received no routed calibration token; "
            "their activation scale falls back to the layer's largest (finite) value"
        )
    return report


class W8A8Settings(Strict):
    # dynamic: per token at run time; dynamic_tensor: one asymmetric scale per input tensor at run time (ONNX
    # Runtime's DynamicQuantizeMatMul); static: one scale per input from calibration
    activations: Literal["dynamic", "dynamic_tensor", "static"] = "dynamic"
    smoothquant_alpha: float | None = Field(0.5, ge=0, le=1)  # None: no smoothing


ACTIVATION_SCHEMES: dict[str, ActivationScheme] = {  # recipe value -> scheme
    "dynamic": DynamicPerToken(), "dynamic_tensor": DynamicPerTensor(), "static": StaticPerTensor(),
}


class W8A8Section(MethodSection):
    """``quantize:`` with ``method: w8a8``."""

    method: Literal["w8a8"] = "w8a8"
    calibration: CalibrationSection = CalibrationSection()
    w8a8: W8A8Settings = W8A8Settings()

    def config(self, dtype: torch.dtype = torch.float32) -> W8A8Config:
        w = self.w8a8
        act = ACTIVATION_SCHEMES[w.activations]
        return W8A8Config(activations=act, smoothquant_alpha=w.smoothquant_alpha, targets=self.targets.spec(),
                          batch_size=self.calibration.batch_size)

    def row_name(self) -> str:
        smooth = "-sq" if self.w8a8.smoothquant_alpha is not None else ""
        return f"w8a8-{self.w8a8.activations}{smooth}"


def _w8a8_static(config: W8A8Config) -> bool:
    return isinstance(config.activations, StaticPerTensor)


def _w8a8_layout(config: W8A8Config) -> Int8Weights:
    return Int8Weights(static_inputs=_w8a8_static(config))


def _w8a8_calibration(config: W8A8Config) -> ActivationRanges | None:
    passes = int(config.smoothquant_alpha is not None) + int(_w8a8_static(config))
    return ActivationRanges(passes) if passes else None


W8A8_COST = MethodCost(layout=_w8a8_layout, calibration=_w8a8_calibration, rounding=EXPERT_BY_EXPERT)


W8A8 = register(Method(
    name="w8a8", cost=W8A8_COST, section=W8A8Section, config=W8A8Config, handler=_w8a8, save=save_quantized_model,
    calibrates=lambda config: config.needs_calibration, exports=True, reload_tolerance=W8A8_RELOAD_TOLERANCE,
    splits_calibration=True,
))