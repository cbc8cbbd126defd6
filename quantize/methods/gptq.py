"""GPTQ (``quantize.method: gptq``, arXiv:2210.17323) on the layer-sequential calibration driver."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import Field
from torch import nn

from dsq.core.errors import QuantizationError
from dsq.core.schema import MAX_WIDTH, Strict

from ..api import QuantizationReport
from ..artifact_save import save_quantized_model
from ..calibrated import _calibrated, _collect, _in_layer, _Run, _stages
from ..gptq import gptq_quantize
from ..cost import STACKED_EXPERTS, Hessians, MethodCost, integer_layout, range_candidates
from ..method import ALWAYS, Method, register
from ..modules import linear_groups
from ..primitives import QuantizedWeight, cat_rows, stack_weights
from ..scheme import PerGroup, WeightScheme
from ..sections import CalibrationSection, WeightMethodSection
from ..sequential import RESIDENT, LayerLifecycle
from ..stats import StatsCollector
from ..targets import TargetDecision, TargetSpec

@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ (arXiv:2210.17323) weight-only quantization.

    Args:
        scheme: integer weight scheme (4/8 bits, per-channel or per-group, sym/asym).
        targets: which modules.
        damp: relative Hessian damping (``percdamp``).
        block_size: lazy-update block width in columns.
        act_order: quantize columns by decreasing Hessian diagonal (static groups).
        unrouted_weight: weight of calibration tokens not routed to an expert in its statistics.
        mse_scales: pick each group's range by a shrink search (``|w - Q(w)|^2.4``) instead of min/max.
        batch_size: calibration sequences per forward.
    """

    scheme: WeightScheme = WeightScheme(4, PerGroup(128))
    targets: TargetSpec = TargetSpec()
    mse_scales: bool = True
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    unrouted_weight: float = 0.1
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0 <= self.unrouted_weight <= 1:
            raise ValueError(f"unrouted_weight must be in [0, 1], got {self.unrouted_weight}")


def _gptq_layer(run: _Run, config: GPTQConfig, prefix: str, layer: nn.Module, forward: Callable) -> None:
    for stage in _stages(_in_layer(run.decisions, prefix)):
        quantized = [d for d in stage if d.quantize]
        linears = {d.name: d.module for d in quantized if d.kind == "linear"}
        experts = [d for d in quantized if d.kind == "experts"]
        collector = StatsCollector(hessian=True, unrouted_weight=config.unrouted_weight, grouped=grouped_linears(quantized))
        _collect(layer, prefix, forward, linears, collector, run.counts if experts else None)
        run.swap(stage, gptq_solve(run, config, quantized, collector))


def grouped_linears(decisions: list[TargetDecision]) -> dict[str, int]:
    """Grouped Linears among ``decisions`` (DeepSeek-V4 ``o_a_proj``) -> their group count."""
    return {d.name: g for d in decisions if d.kind == "linear" and (g := linear_groups(d.module)) is not None}


def gptq_solve(run: _Run, config: GPTQConfig, decisions: list[TargetDecision], collector: StatsCollector) -> dict[str, QuantizedWeight]:
    """GPTQ integers of every Linear and fused experts module in ``decisions`` from the Hessians in ``collector``.

    Returns result keys ``<linear>.weight`` and ``<experts>.gate_up_proj`` / ``<experts>.down_proj`` (stacked
    ``[experts, out, in]``).
    """
    results: dict[str, QuantizedWeight] = {}
    for d in decisions:
        if d.kind == "linear" and (groups := linear_groups(d.module)) is not None:
            # each group's rows see only that group's inputs: one solve per group with its own Hessian
            blocks = d.module.weight.view(groups, -1, d.module.weight.shape[-1])  # (G, d_g, in_g)
            results[f"{d.name}.weight"] = cat_rows([
                _gptq_one(run, config, f"{d.name}.group.{g}", blocks[g], collector[f"{d.name}.group.{g}"].hessian)
                for g in range(groups)
            ])
            continue
        if d.kind == "linear":
            results[f"{d.name}.weight"] = _gptq_one(run, config, d.name, d.module.weight, collector[d.name].hessian)
            continue
        gate_up, down = [], []
        for e in range(d.module.gate_up_proj.shape[0]):
            gate_up.append(_gptq_one(run, config, f"{d.name}.{e}.gate_up_proj", d.module.gate_up_proj[e], collector[f"{d.name}.gate_up_proj.{e}"].hessian))
            down.append(_gptq_one(run, config, f"{d.name}.{e}.down_proj", d.module.down_proj[e], collector[f"{d.name}.down_proj.{e}"].hessian))
        results[f"{d.name}.gate_up_proj"] = stack_weights(gate_up)
        results[f"{d.name}.down_proj"] = stack_weights(down)
    return results


def _gptq_one(run: _Run, config: GPTQConfig, name: str, weight: torch.Tensor, hessian: torch.Tensor) -> QuantizedWeight:
    try:
        result = gptq_quantize(
            weight, hessian, config.scheme, damp=config.damp, block_size=config.block_size,
            act_order=config.act_order, mse_scales=config.mse_scales,
        )
    except torch.linalg.LinAlgError as exc:
        raise QuantizationError(f"{name}: GPTQ failed: {exc}") from exc
    run.per_module[name] = {"gptq_loss": result.loss}
    return result.qweight


def _gptq_head(run: _Run, config: GPTQConfig, d: TargetDecision, x: torch.Tensor) -> QuantizedWeight:
    collector = StatsCollector(hessian=True)
    collector.linear_input(d.name, x)
    return _gptq_one(run, config, d.name, d.module.weight, collector[d.name].hessian)


def _gptq(
    model: nn.Module, config: GPTQConfig, calibration: torch.Tensor | None, progress: bool, lifecycle: LayerLifecycle = RESIDENT
) -> QuantizationReport:
    run = _calibrated(model, config, calibration, "gptq", _gptq_layer, _gptq_head, progress, lifecycle)
    return run.finish(
        {"damp": config.damp, "block_size": config.block_size, "act_order": config.act_order, "unrouted_weight": config.unrouted_weight}
    )


class GPTQSettings(Strict):
    damp: float = Field(0.01, gt=0, lt=1)  # lambda = damp * mean(diag H)
    block_size: int = Field(128, ge=1, le=MAX_WIDTH)
    act_order: bool = True  # columns by decreasing diag(H); groups stay in place (static groups)
    mse_scales: bool = True  # each group's range from a shrink search instead of min/max
    unrouted_weight: float = Field(0.1, ge=0, le=1)  # weight of tokens not routed to an expert in its Hessian


class GPTQSection(WeightMethodSection):
    """``quantize:`` with ``method: gptq``."""

    method: Literal["gptq"] = "gptq"
    calibration: CalibrationSection = CalibrationSection()
    gptq: GPTQSettings = GPTQSettings()

    def config(self, dtype: torch.dtype = torch.float32) -> GPTQConfig:
        g = self.gptq
        return GPTQConfig(self.weights.scheme(), self.targets.spec(), mse_scales=g.mse_scales, damp=g.damp,
                          block_size=g.block_size, act_order=g.act_order, unrouted_weight=g.unrouted_weight,
                          batch_size=self.calibration.batch_size)


def _gptq_calibration(config: GPTQConfig) -> Hessians:
    return Hessians(block_size=config.block_size, range_candidates=range_candidates(config.mse_scales))


GPTQ_COST = MethodCost(layout=integer_layout, calibration=_gptq_calibration, rounding=STACKED_EXPERTS)


GPTQ = register(Method(
    name="gptq", cost=GPTQ_COST, section=GPTQSection, config=GPTQConfig, handler=_gptq, save=save_quantized_model,
    calibrates=ALWAYS, streams=True, exports=True, qat_start=True, lora_base=True,
))