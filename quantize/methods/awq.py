"""AWQ (``quantize.method: awq``, arXiv:2306.00978): balance scales, then clipped round-to-nearest."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import Field
from torch import nn

from dsq.core.errors import QuantizationError
from dsq.core.ranks import Ranks
from dsq.core.schema import MAX_TOKEN_BUDGET, Strict

from ..api import QuantizationReport
from ..artifact_save import save_quantized_model
from ..gptq import static_qparams
from ..awq import ScaleSearch, candidate_scales, fake_quantize, search_clip, search_scale, weight_mean
from ..calibrated import _calibrated, _collect, _in_layer, _Run
from ..mappings import Balance, balance_weight, find, fold, input_key, resolve, without_balance
from ..cost import STACKED_EXPERTS, MethodCost, integer_layout, range_candidates
from ..cost import ScaleSearch as SearchCost
from ..method import ALWAYS, Method, register
from ..primitives import QuantizedWeight, quantize_rtn, quantize_with_qparams, stack_weights
from ..scheme import PerGroup, WeightScheme
from ..sections import CalibrationSection, WeightMethodSection
from ..sequential import RESIDENT, ExpertTokenCounts, LayerLifecycle, capture_calls, first_tensor
from ..stats import InputStats, StatsCollector, max_over_median
from ..targets import TargetDecision, TargetSpec

@dataclass(frozen=True)
class AWQConfig:
    """AWQ (arXiv:2306.00978): balance scales from :mod:`.mappings`, then clipped round-to-nearest.

    Args:
        scheme: integer weight scheme.
        targets: which modules.
        grid: exponents tried in the scale search.
        clip: search a clipping threshold per group after scaling.
        clip_grid: thresholds ``1 - i/clip_grid`` tried, down to ``1 - max_shrink``.
        max_shrink: largest relative shrink of a group's range.
        search_tokens: calibration rows kept per input for the searches (statistics use all).
        unrouted_weight: weight of calibration tokens not routed to an expert in its statistics.
        mse_scales: pick each group's range by a shrink search (``|w - Q(w)|^2.4``) after scaling.
        duo_scaling: candidates ``mean|x|^r / mean|w|^(1-r)`` instead of ``mean|x|^r``.
        batch_size: calibration sequences per forward.
    """

    scheme: WeightScheme = WeightScheme(4, PerGroup(128))
    targets: TargetSpec = TargetSpec()
    grid: int = 20
    clip: bool = False
    clip_grid: int = 20
    max_shrink: float = 0.5
    search_tokens: int = 4096
    unrouted_weight: float = 1.0
    mse_scales: bool = True
    duo_scaling: bool = False
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.grid < 1 or self.clip_grid < 1:
            raise ValueError("grid and clip_grid must be >= 1")
        if not 0 < self.max_shrink < 1:
            raise ValueError(f"max_shrink must be in (0, 1), got {self.max_shrink}")
        if self.search_tokens < 1:
            raise ValueError(f"search_tokens must be >= 1, got {self.search_tokens}")
        if not 0 <= self.unrouted_weight <= 1:
            raise ValueError(f"unrouted_weight must be in [0, 1], got {self.unrouted_weight}")


def _awq_layer(run: _Run, config: AWQConfig, prefix: str, layer: nn.Module, forward: Callable) -> None:
    decisions = _in_layer(run.decisions, prefix)
    quantized = {d.name for d in decisions if d.quantize}
    n_batches = -(-run.calibration.shape[0] // config.batch_size)
    rows = -(-config.search_tokens // n_batches)  # sample rows kept per forward call
    calls = -(-config.search_tokens // (config.batch_size * run.calibration.shape[1]))  # parent calls kept
    linears = {d.name: d.module for d in decisions if d.kind == "linear"}

    # 1. balance scales, searched on the layer's full-precision inputs
    collector = StatsCollector(sample_rows=rows, unrouted_weight=config.unrouted_weight)
    parents = {n: m for n in ("self_attn", "mlp") if (m := find(layer, n)) is not None}
    _check_replayed_calls(run, config, calls)
    with capture_calls(parents, calls) as captured:
        _collect(layer, prefix, forward, linears, collector, run.counts)
    collector.reduce(run.ranks)
    for m in resolve(layer):
        _balance(run, config, prefix, layer, m, collector, quantized, captured)
    run.without_balance |= without_balance(prefix, layer, quantized)

    # 2. clipping needs the inputs the rescaled layer really sees
    if config.clip:
        collector = _collect(layer, prefix, forward, linears,
                             StatsCollector(sample_rows=rows, unrouted_weight=config.unrouted_weight), ExpertTokenCounts())
        collector.reduce(run.ranks)
    results: dict[str, QuantizedWeight] = {}
    for d in decisions:
        if not d.quantize:
            continue
        if d.kind == "linear":
            results[f"{d.name}.weight"] = _awq_round(config, d.module.weight, collector[d.name])
        else:
            E = d.module.gate_up_proj.shape[0]
            results[f"{d.name}.gate_up_proj"] = stack_weights(
                [_awq_round(config, d.module.gate_up_proj[e], collector[f"{d.name}.gate_up_proj.{e}"]) for e in range(E)]
            )
            results[f"{d.name}.down_proj"] = stack_weights(
                [_awq_round(config, d.module.down_proj[e], collector[f"{d.name}.down_proj.{e}"]) for e in range(E)]
            )
    run.swap(decisions, results)


def _awq_round(config: AWQConfig, weight: torch.Tensor, stats: InputStats) -> QuantizedWeight:
    """Round the (rescaled) weight: optional output-aware clipping, then min/max or range-searched scales."""
    w = weight.detach().float()
    if config.clip:
        w = search_clip(w, stats.sample(), config.scheme, grid=config.clip_grid, max_shrink=config.max_shrink)
    if config.mse_scales:
        scale, zero = static_qparams(w, config.scheme, mse=True)
        return quantize_with_qparams(w, scale, zero, config.scheme)
    return quantize_rtn(w, config.scheme)


def _parent_name(m: Balance) -> str:
    """The block whose output AWQ's search compares (the reference implementation's ``module2inspect``)."""
    return "self_attn" if m.smooth == "input_layernorm" or m.smooth.startswith("self_attn.") else "mlp"


def _scaled_call(args: tuple, kwargs: dict, s: torch.Tensor | None) -> tuple[tuple, dict]:
    """Divide the hidden-states input by ``s`` (the smooth op folded outside the parent)."""
    if s is None:
        return args, kwargs
    if "hidden_states" in kwargs:
        kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"] / s.to(kwargs["hidden_states"].dtype)}
    else:
        args = (args[0] / s.to(args[0].dtype), *args[1:])
    return args, kwargs


@torch.no_grad()
def _block_search(layer: nn.Module, m: Balance, config: AWQConfig, x_mean: torch.Tensor, calls, quantized_names: list[str]):
    """Grid-search ``s`` for mapping ``m`` on the parent block's output (attention or MLP/MoE)."""
    parent = layer.get_submodule(_parent_name(m))
    touched = [layer.get_submodule(n) for n in (m.smooth, *m.balance, *m.compensate)]
    saved = [(p, p.detach().clone()) for mod in touched for p in mod.parameters(recurse=False)]
    refs = [first_tensor(parent(*a, **k)).float() for a, k in calls]

    def loss_of(s: torch.Tensor) -> float:
        fold(layer, m, s)
        for name in quantized_names:
            w = balance_weight(layer.get_submodule(name))
            w.copy_(fake_quantize(w, config.scheme).to(w.dtype))  # min/max: measured better than the range search here
        loss = 0.0
        for (a, k), ref in zip(calls, refs):
            a, k = _scaled_call(a, k, s if m.smooth in _OUTSIDE else None)
            loss += float((first_tensor(parent(*a, **k)).float() - ref).pow(2).mean())
        for p, value in saved:
            p.copy_(value)
        return loss / max(1, len(calls))

    one = torch.ones_like(x_mean, dtype=torch.float32)
    unscaled = loss_of(one)
    best = ScaleSearch(s=one, ratio=float("nan"), loss=unscaled, loss_unscaled=unscaled)
    w_mean = None
    if config.duo_scaling:
        w_mean = weight_mean([balance_weight(layer.get_submodule(n)) for n in quantized_names], config.scheme)
    for ratio, s in candidate_scales(x_mean, w_mean, config.grid):
        loss = loss_of(s)
        if loss < best.loss:
            best = ScaleSearch(s=s, ratio=ratio, loss=loss, loss_unscaled=unscaled)
    return best


def _balance(
    run: _Run, config: AWQConfig, prefix: str, layer: nn.Module, m: Balance, collector: StatsCollector,
    quantized: set[str], captured: dict,
) -> None:
    """Search and fold the scale of mapping ``m`` (one per expert when ``m.per_expert``)."""
    if m.per_expert:
        experts = layer.get_submodule(m.smooth)
        name = f"{prefix}.{m.smooth}"
        if name not in quantized:
            return
        scales, ratios = [], []
        for e in range(experts.down_proj.shape[0]):
            st = collector[f"{name}.down_proj.{e}"]
            found = search_scale(st.sample(), st.mean_abs, [experts.down_proj[e]], config.scheme, grid=config.grid, duo_scaling=False)
            scales.append(found.s)
            ratios.append(found.ratio)
        fold(layer, m, torch.stack(scales))
        run.per_module[f"{name}.down_proj"] = {"awq_ratio_per_expert": ratios}
        return
    targets = [b for b in m.balance if f"{prefix}.{b}" in quantized]
    if not targets:
        return
    x_mean = collector[input_key(prefix, m)].mean_abs  # (C,)
    if run.ranks.main:  # the replayed calls are the first batches', which rank 0 holds
        found = _block_search(layer, m, config, x_mean, captured[_parent_name(m)], targets)
    else:
        found = ScaleSearch(torch.empty_like(x_mean), 0.0, 0.0, 0.0)
    found = _share_search(run, found)
    fold(layer, m, found.s)
    run.per_module[f"{prefix}.{m.smooth}"] = {
        "awq_balances": list(m.balance),
        "input_max_over_median": max_over_median(x_mean),
        "awq_ratio": found.ratio,
        "awq_loss": found.loss,
        "awq_loss_without_scaling": found.loss_unscaled,
    }


def _share_search(run: _Run, found: ScaleSearch) -> ScaleSearch:
    """Rank 0's search result on every rank (the others pass a placeholder of the same shape)."""
    if not run.ranks.several:
        return found
    s = run.ranks.broadcast_(found.s.contiguous(), 0)
    figures = run.ranks.broadcast_(torch.tensor([found.ratio, found.loss, found.loss_unscaled], dtype=torch.float64, device=s.device), 0)
    ratio, loss, unscaled = (float(v) for v in figures)
    return ScaleSearch(s=s, ratio=ratio, loss=loss, loss_unscaled=unscaled)


def _check_replayed_calls(run: _Run, config: AWQConfig, calls: int) -> None:
    """The block searches replay the first ``calls`` calibration batches; with several processes rank 0 must hold them."""
    if not run.ranks.several:
        return
    batches = -(-run.calibration.shape[0] // config.batch_size)
    first = len(Ranks(0, run.ranks.world).share(batches))
    replayed = min(calls, batches)
    if first < replayed:
        raise QuantizationError(
            f"awq replays the first {replayed} calibration batches (awq.search_tokens {config.search_tokens}); with "
            f"{run.ranks.world} processes the first one holds {first}: use fewer processes, more samples or fewer search_tokens"
        )


def _awq_head(run: _Run, config: AWQConfig, d: TargetDecision, x: torch.Tensor) -> QuantizedWeight:
    collector = StatsCollector(sample_rows=config.search_tokens)
    collector.linear_input(d.name, run.ranks.gather_rows(x.reshape(-1, x.shape[-1])))  # one call over every rank's rows
    return _awq_round(config, d.module.weight, collector[d.name])


def _awq(
    model: nn.Module, config: AWQConfig, calibration: torch.Tensor | None, progress: bool, lifecycle: LayerLifecycle = RESIDENT
) -> QuantizationReport:
    run = _calibrated(model, config, calibration, "awq", _awq_layer, _awq_head, progress, lifecycle)
    return run.finish(
        {"grid": config.grid, "clip": config.clip, "search_tokens": config.search_tokens, "unrouted_weight": config.unrouted_weight}
    )


_OUTSIDE = ("input_layernorm", "post_attention_layernorm")  # smooth ops that feed the parent from outside


class AWQSettings(Strict):
    grid: int = Field(20, ge=1, le=1000)  # scale exponents tried
    clip: bool = False  # output-aware clipping search per group (raised perplexity on the bundled model)
    mse_scales: bool = True  # each group's range from a shrink search instead of min/max
    duo_scaling: bool = False  # candidates mean|x|^r / mean|w|^(1-r)
    search_tokens: int = Field(4096, ge=1, le=MAX_TOKEN_BUDGET)
    unrouted_weight: float = Field(1.0, ge=0, le=1)


class AWQSection(WeightMethodSection):
    """``quantize:`` with ``method: awq``."""

    method: Literal["awq"] = "awq"
    calibration: CalibrationSection = CalibrationSection()
    awq: AWQSettings = AWQSettings()

    def config(self, dtype: torch.dtype = torch.float32) -> AWQConfig:
        a = self.awq
        return AWQConfig(self.weights.scheme(), self.targets.spec(), grid=a.grid, clip=a.clip, search_tokens=a.search_tokens,
                         unrouted_weight=a.unrouted_weight, mse_scales=a.mse_scales, duo_scaling=a.duo_scaling,
                         batch_size=self.calibration.batch_size)


def _awq_calibration(config: AWQConfig) -> SearchCost:
    return SearchCost(config.search_tokens, config.grid, config.clip, range_candidates(config.mse_scales))


AWQ_COST = MethodCost(layout=integer_layout, calibration=_awq_calibration, rounding=STACKED_EXPERTS)


AWQ = register(Method(
    name="awq", cost=AWQ_COST, section=AWQSection, config=AWQConfig, handler=_awq, save=save_quantized_model,
    calibrates=ALWAYS, streams=True, exports=True, qat_start=True, lora_base=True, splits_calibration=True,
))