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
from ..gptq import HessianNotPositiveDefinite, gptq_quantize_batched
from ..cost import STACKED_EXPERTS, Hessians, MethodCost, integer_layout, range_candidates
from ..method import ALWAYS, Method, register
from ..modules import linear_groups
from ..primitives import QuantizedWeight, cat_rows, stack_weights
from ..scheme import PerGroup, WeightScheme
from ..sections import CalibrationSection, WeightMethodSection
from ..sequential import RESIDENT, LayerLifecycle, LayerRunner
from ..stats import InputStats, StatsCollector
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
        expert_chunk: weights of one shape solved together (experts of one projection, same-shape Linears);
            bounds the solve's memory (``dsq plan`` counts it); 1 solves one weight at a time.
    """

    scheme: WeightScheme = WeightScheme(4, PerGroup(128))
    targets: TargetSpec = TargetSpec()
    mse_scales: bool = True
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    unrouted_weight: float = 0.1
    batch_size: int = 8
    expert_chunk: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0 <= self.unrouted_weight <= 1:
            raise ValueError(f"unrouted_weight must be in [0, 1], got {self.unrouted_weight}")
        if self.expert_chunk < 1:
            raise ValueError(f"expert_chunk must be >= 1, got {self.expert_chunk}")


def _gptq_layer(run: _Run, config: GPTQConfig, prefix: str, layer: nn.Module, forward: Callable) -> None:
    for stage in _stages(_in_layer(run.decisions, prefix)):
        quantized = [d for d in stage if d.quantize]
        linears = {d.name: d.module for d in quantized if d.kind == "linear"}
        experts = [d for d in quantized if d.kind == "experts"]
        collector = StatsCollector(hessian=True, unrouted_weight=config.unrouted_weight, grouped=grouped_linears(quantized),
                                   channels=False)
        _collect(layer, prefix, _stage_forward(layer, stage, forward), linears, collector, run.counts if experts else None)
        run.swap(stage, gptq_solve(run, config, quantized, collector.reduce(run.ranks)))


def _stage_forward(layer: nn.Module, stage: list[TargetDecision], forward: Callable) -> Callable:
    """The attention stage needs the layer only as far as its attention: the MLP/MoE after it is not run."""
    attention = getattr(layer, "self_attn", None)
    if attention is None or not isinstance(forward, LayerRunner) or not all(".self_attn." in d.name for d in stage):
        return forward
    return lambda: forward.run_until(attention)


def grouped_linears(decisions: list[TargetDecision]) -> dict[str, int]:
    """Grouped Linears among ``decisions`` (DeepSeek-V4 ``o_a_proj``) -> their group count."""
    return {d.name: g for d in decisions if d.kind == "linear" and (g := linear_groups(d.module)) is not None}


@dataclass(frozen=True)
class GPTQSolve:
    """One weight GPTQ rounds: its report name, weight ``[out, in]``, the statistics of its input (the fp32
    Hessian ``[in, in]`` is made when its chunk is solved) and its scheme."""

    name: str
    weight: torch.Tensor
    stats: InputStats
    scheme: WeightScheme


def gptq_solves(decisions: list[TargetDecision], collector: StatsCollector, scheme: WeightScheme) -> dict[str, list[GPTQSolve]]:
    """Every weight to round among ``decisions``, by result key (``<linear>.weight``, ``<experts>.gate_up_proj``,
    ``<experts>.down_proj``); a result made of several weights (experts, the groups of a grouped Linear) lists
    them in order. ``scheme`` is the method's; a module's scheme rule overrides it."""
    solves: dict[str, list[GPTQSolve]] = {}
    for d in decisions:
        own = d.scheme_or(scheme)
        if d.kind == "linear" and (groups := linear_groups(d.module)) is not None:
            # each group's rows see only that group's inputs: one solve per group with its own Hessian
            blocks = d.module.weight.view(groups, -1, d.module.weight.shape[-1])  # (G, d_g, in_g)
            solves[f"{d.name}.weight"] = [
                GPTQSolve(f"{d.name}.group.{g}", blocks[g], collector[f"{d.name}.group.{g}"], own) for g in range(groups)
            ]
        elif d.kind == "linear":
            solves[f"{d.name}.weight"] = [GPTQSolve(d.name, d.module.weight, collector[d.name], own)]
        else:
            for proj in ("gate_up_proj", "down_proj"):
                stacked = getattr(d.module, proj)  # (E, out, in)
                solves[f"{d.name}.{proj}"] = [
                    GPTQSolve(f"{d.name}.{e}.{proj}", stacked[e], collector[f"{d.name}.{proj}.{e}"], own)
                    for e in range(stacked.shape[0])
                ]
    return solves


def gptq_solve(run: _Run, config: GPTQConfig, decisions: list[TargetDecision], collector: StatsCollector) -> dict[str, QuantizedWeight]:
    """GPTQ integers of every Linear and fused experts module in ``decisions`` from the Hessians in ``collector``.

    Weights of one shape (the experts of one projection, the groups of a grouped Linear, same-shape Linears)
    are solved together, ``config.expert_chunk`` at a time (:func:`~..gptq.gptq_quantize_batched`).

    Returns result keys ``<linear>.weight`` and ``<experts>.gate_up_proj`` / ``<experts>.down_proj`` (stacked
    ``[experts, out, in]``).
    """
    solves = gptq_solves(decisions, collector, config.scheme)
    rounded = solve_batched(run, config, [s for group in solves.values() for s in group])
    results = {}
    for key, group in solves.items():
        parts = [rounded[s.name] for s in group]
        if key.endswith(".weight"):
            results[key] = parts[0] if len(parts) == 1 else cat_rows(parts)
        else:
            results[key] = stack_weights(parts)
    return results


def solve_batched(run: _Run, config: GPTQConfig, solves: list[GPTQSolve]) -> dict[str, QuantizedWeight]:
    """GPTQ of ``solves`` by shape and scheme, ``config.expert_chunk`` weights per batched solve; name -> integers.

    With several processes the chunks are dealt round robin; each is solved by its owner and handed to
    every rank (a weight's integers do not depend on the chunk it is solved in).
    """
    by_shape: dict[tuple, list[GPTQSolve]] = {}
    for s in solves:
        by_shape.setdefault((*s.weight.shape, s.scheme), []).append(s)
    chunks = [group[c : c + config.expert_chunk] for group in by_shape.values() for c in range(0, len(group), config.expert_chunk)]
    # every rank solves its own chunks first, then the results are handed round in chunk order
    mine = {i: _gptq_chunk(run, config, chunk) for i, chunk in enumerate(chunks) if run.ranks.owner(i) == run.ranks.rank}
    rounded: dict[str, QuantizedWeight] = {}
    for index, chunk in enumerate(chunks):
        result = mine.get(index)
        if run.ranks.several:
            result = _share_chunk(run, config, chunk, result, run.ranks.owner(index))
        rounded.update(result)
    return rounded


def _share_chunk(run: _Run, config: GPTQConfig, chunk: list[GPTQSolve], mine: dict[str, QuantizedWeight] | None,
                 owner: int) -> dict[str, QuantizedWeight]:
    """The owner's integers, scales (zeros) and proxy losses of ``chunk``, on every rank."""
    scheme = chunk[0].scheme
    out, inp = chunk[0].weight.shape
    groups = scheme.granularity.num_groups(inp)
    device = chunk[0].stats.device
    if mine is not None:
        q = torch.stack([mine[s.name].qweight for s in chunk])
        scale = torch.stack([mine[s.name].scale for s in chunk])
        zero = torch.stack([mine[s.name].zero for s in chunk]) if not scheme.symmetric else None
        loss = torch.tensor([run.per_module[s.name]["gptq_loss"] for s in chunk], dtype=torch.float64, device=device)
    else:
        q = torch.empty(len(chunk), out, inp, dtype=torch.int8, device=device)
        scale = torch.empty(len(chunk), out, groups, dtype=torch.float32, device=device)
        zero = torch.empty(len(chunk), out, groups, dtype=torch.int8, device=device) if not scheme.symmetric else None
        loss = torch.empty(len(chunk), dtype=torch.float64, device=device)
    for t in (q, scale, zero, loss):
        if t is not None:
            run.ranks.broadcast_(t, owner)
    shared = {}
    for b, s in enumerate(chunk):
        run.per_module[s.name] = {"gptq_loss": float(loss[b])}
        shared[s.name] = QuantizedWeight(q[b], scale[b], zero[b] if zero is not None else None, scheme)
    return shared


def _gptq_chunk(run: _Run, config: GPTQConfig, chunk: list[GPTQSolve]) -> dict[str, QuantizedWeight]:
    weights = torch.stack([s.weight.detach() for s in chunk])  # (B, out, in)
    hessians = torch.stack([s.stats.hessian for s in chunk])  # (B, in, in)
    try:
        results = gptq_quantize_batched(
            weights, hessians, chunk[0].scheme, damp=config.damp, block_size=config.block_size,
            act_order=config.act_order, mse_scales=config.mse_scales,
        )
    except HessianNotPositiveDefinite as exc:
        raise QuantizationError(f"{chunk[exc.index].name}: GPTQ failed: {exc}") from exc
    for s, result in zip(chunk, results):
        run.per_module[s.name] = {"gptq_loss": result.loss}
    return {s.name: result.qweight for s, result in zip(chunk, results)}


def _gptq_head(run: _Run, config: GPTQConfig, d: TargetDecision, x: torch.Tensor) -> QuantizedWeight:
    collector = StatsCollector(hessian=True, channels=False)
    collector.linear_input(d.name, x)
    collector.reduce(run.ranks)
    return solve_batched(run, config, [GPTQSolve(d.name, d.module.weight, collector[d.name], d.scheme_or(config.scheme))])[d.name]


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
    expert_chunk: int = Field(8, ge=1)  # weights of one shape solved together (bounds the solve's memory)


class GPTQSection(WeightMethodSection):
    """``quantize:`` with ``method: gptq``."""

    method: Literal["gptq"] = "gptq"
    calibration: CalibrationSection = CalibrationSection()
    gptq: GPTQSettings = GPTQSettings()

    def config(self, dtype: torch.dtype = torch.float32) -> GPTQConfig:
        g = self.gptq
        return GPTQConfig(self.weights.scheme(), self.targets.spec(), mse_scales=g.mse_scales, damp=g.damp,
                          block_size=g.block_size, act_order=g.act_order, unrouted_weight=g.unrouted_weight,
                          batch_size=self.calibration.batch_size, expert_chunk=g.expert_chunk)


def _gptq_calibration(config: GPTQConfig) -> Hessians:
    return Hessians(block_size=config.block_size, range_candidates=range_candidates(config.mse_scales), solve_batch=config.expert_chunk)


GPTQ_COST = MethodCost(layout=integer_layout, calibration=_gptq_calibration, rounding=STACKED_EXPERTS)


GPTQ = register(Method(
    name="gptq", cost=GPTQ_COST, section=GPTQSection, config=GPTQConfig, handler=_gptq, save=save_quantized_model,
    calibrates=ALWAYS, streams=True, exports=True, qat_start=True, lora_base=True, splits_calibration=True,
    mixed_schemes=True,
))