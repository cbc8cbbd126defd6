"""Calibrated weight quantization (GPTQ, AWQ) on the layer-sequential driver.

Both methods share one orchestration: select targets, walk the decoder layers with
:func:`~.sequential.sequential_calibrate`, collect the statistics the method needs from the
layer's real inputs (every token through every expert), quantize the layer's modules,
swap them in, and move on. Modules outside the decoder layers (``lm_head`` when targeted) are
handled in a final head stage on the final norm's output. Every quantizable module ends up
in the report; an expert that received no routed calibration token is named in the report's
notes (its statistics come from the all-token pass, so its scales are still well-defined).

Example:
    >>> report = quantize_(model, GPTQConfig(WeightScheme(4, PerGroup(128))), calibration=ids)
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dsq.core.errors import QuantizationError

from .api import QuantizationReport, check_finite, register_handler, require_resident, start_report, swap_decision
from .awq import ScaleSearch, candidate_scales, fake_quantize, search_clip, search_scale, weight_mean
from .gptq import gptq_quantize, static_qparams
from .mappings import Balance, balance_weight, find, fold, input_key, resolve
from .primitives import QuantizedWeight, quantize_rtn, quantize_with_qparams, stack_weights
from .scheme import PerGroup, WeightScheme
from .sequential import (
    RESIDENT, ExpertTokenCounts, LayerLifecycle, capture_calls, decoder_layers, first_tensor, observe_experts, observe_inputs,
    sequential_calibrate,
)
from .smoothquant import smoothing_factors
from .w8a8 import ActivationScheme, DynamicPerToken, StaticPerTensor, quantize_w8a8_
from .stats import InputStats, StatsCollector, max_over_median
from .targets import TargetDecision, TargetSpec, select_targets


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


def require_calibration(calibration: torch.Tensor | None, method: str) -> torch.Tensor:
    if calibration is None or calibration.numel() == 0:
        raise QuantizationError(f"{method} needs calibration data: pass calibration=(samples, seq_len) token ids")
    if calibration.dim() != 2:
        raise QuantizationError(f"{method}: calibration must be (samples, seq_len) token ids, got shape {tuple(calibration.shape)}")
    return calibration


def _in_layer(decisions: list[TargetDecision], prefix: str) -> list[TargetDecision]:
    return [d for d in decisions if d.name.startswith(prefix + ".")]


def _collect(layer: nn.Module, prefix: str, forward: Callable, linears: dict[str, nn.Module], collector: StatsCollector,
             counts: ExpertTokenCounts | None) -> StatsCollector:
    """Run the layer once with ``collector`` observing ``linears`` and, when ``counts`` is given, the experts."""
    experts = observe_experts(layer, prefix, collector, counts) if counts is not None else nullcontext()
    with observe_inputs(linears, collector.linear_input), experts:
        forward()
    return collector


def _lookup(results: dict[str, QuantizedWeight]) -> Callable[[str, torch.Tensor], QuantizedWeight]:
    def quantizer(name: str, weight: torch.Tensor) -> QuantizedWeight:
        qw = results[name]
        check_finite(name, qw)
        return qw

    return quantizer


class _Run:
    """State of one calibrated run: decisions, report, expert counts and per-module results."""

    def __init__(self, model: nn.Module, targets: TargetSpec, method: str, scheme: WeightScheme, calibration: torch.Tensor):
        self.model = model
        self.method = method
        self.scheme = scheme
        self.decisions = select_targets(model, targets)
        self.report = start_report(model, self.decisions, method=method, scheme=scheme.describe())
        self.counts = ExpertTokenCounts()
        self.done: set[str] = set()
        self.per_module: dict[str, dict] = {}
        self.calibration = calibration

    def swap(self, decisions: list[TargetDecision], results: dict[str, QuantizedWeight]) -> None:
        for d in decisions:
            self.report.modules.append(swap_decision(self.model, d, _lookup(results), self.scheme.describe()))
            self.done.add(d.name)

    def head_decisions(self) -> list[TargetDecision]:
        return [d for d in self.decisions if d.name not in self.done]

    def finish(self, extra: dict) -> QuantizationReport:
        left = [d.name for d in self.decisions if d.name not in self.done and d.quantize]
        if left:
            raise QuantizationError(f"{self.method}: modules outside the decoder layers were not handled: {', '.join(left)}")
        samples, seq_len = self.calibration.shape
        starved = self.counts.starved()
        self.report.calibration = {
            "samples": samples,
            "seq_len": seq_len,
            "tokens": samples * seq_len,
            "expert_routed_tokens": self.counts.counts,
            "experts_without_routed_tokens": starved,
            "expert_statistics": "every calibration token through every expert (routed output kept)",
            "modules": self.per_module,
            **extra,
        }
        for name, experts in starved.items():
            self.report.notes.append(
                f"{name}: expert(s) {experts} received no routed calibration token; "
                "their statistics come from the all-token pass"
            )
        return self.report


def _head_inputs(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Input of ``lm_head``: the final norm of the last layer's output."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    if norm is None:
        raise QuantizationError(f"{type(model).__name__}: no final norm found (model.model.norm) for the lm_head stage")
    with torch.no_grad():
        return norm(hidden)


# ----------------------------------------------------------------------------- GPTQ


def _stages(decisions: list[TargetDecision]) -> list[list[TargetDecision]]:
    """Attention modules first, then the MLP/MoE: the MLP is calibrated on the quantized attention's output."""
    attn = [d for d in decisions if ".self_attn." in d.name]
    rest = [d for d in decisions if ".self_attn." not in d.name]
    return [s for s in (attn, rest) if s]


def _gptq_layer(run: _Run, config: GPTQConfig, prefix: str, layer: nn.Module, forward: Callable) -> None:
    for stage in _stages(_in_layer(run.decisions, prefix)):
        quantized = [d for d in stage if d.quantize]
        linears = {d.name: d.module for d in quantized if d.kind == "linear"}
        experts = [d for d in quantized if d.kind == "experts"]
        collector = StatsCollector(hessian=True, unrouted_weight=config.unrouted_weight)
        _collect(layer, prefix, forward, linears, collector, run.counts if experts else None)
        results: dict[str, QuantizedWeight] = {}
        for name, linear in linears.items():
            results[f"{name}.weight"] = _gptq_one(run, config, name, linear.weight, collector[name].hessian)
        for d in experts:
            gate_up, down = [], []
            for e in range(d.module.gate_up_proj.shape[0]):
                gate_up.append(_gptq_one(run, config, f"{d.name}.{e}.gate_up_proj", d.module.gate_up_proj[e], collector[f"{d.name}.gate_up_proj.{e}"].hessian))
                down.append(_gptq_one(run, config, f"{d.name}.{e}.down_proj", d.module.down_proj[e], collector[f"{d.name}.down_proj.{e}"].hessian))
            results[f"{d.name}.gate_up_proj"] = stack_weights(gate_up)
            results[f"{d.name}.down_proj"] = stack_weights(down)
        run.swap(stage, results)


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


LayerFn = Callable[["_Run", object, str, nn.Module, Callable], None]
HeadFn = Callable[["_Run", object, TargetDecision, torch.Tensor], QuantizedWeight]


def _calibrated(model: nn.Module, config, calibration: torch.Tensor | None, method: str, layer_fn: LayerFn, head_fn: HeadFn,
                progress: bool, lifecycle: LayerLifecycle) -> _Run:
    """Run ``layer_fn`` over the decoder layers, then ``head_fn`` for targeted modules outside them."""
    ids = require_calibration(calibration, method)
    run = _Run(model, config.targets, method, config.scheme, ids)
    hidden = sequential_calibrate(
        model, ids, lambda p, layer, fwd: layer_fn(run, config, p, layer, fwd), batch_size=config.batch_size, progress=progress,
        lifecycle=lifecycle,
    )
    head = run.head_decisions()
    results = {}
    if any(d.quantize for d in head):
        x = _head_inputs(model, hidden)
        for d in head:
            if d.quantize and d.kind == "linear":
                results[f"{d.name}.weight"] = head_fn(run, config, d, x)
    run.swap(head, results)
    return run


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


# ----------------------------------------------------------------------------- AWQ


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
    with capture_calls(parents, calls) as captured:
        _collect(layer, prefix, forward, linears, collector, run.counts)
    for m in resolve(layer):
        _balance(run, config, prefix, layer, m, collector, quantized, captured)

    # 2. clipping needs the inputs the rescaled layer really sees
    if config.clip:
        collector = _collect(layer, prefix, forward, linears,
                             StatsCollector(sample_rows=rows, unrouted_weight=config.unrouted_weight), ExpertTokenCounts())
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


_OUTSIDE = ("input_layernorm", "post_attention_layernorm")  # smooth ops that feed the parent from outside


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
    found = _block_search(layer, m, config, x_mean, captured[_parent_name(m)], targets)
    fold(layer, m, found.s)
    run.per_module[f"{prefix}.{m.smooth}"] = {
        "awq_balances": list(m.balance),
        "input_max_over_median": max_over_median(x_mean),
        "awq_ratio": found.ratio,
        "awq_loss": found.loss,
        "awq_loss_without_scaling": found.loss_unscaled,
    }


def _awq_head(run: _Run, config: AWQConfig, d: TargetDecision, x: torch.Tensor) -> QuantizedWeight:
    collector = StatsCollector(sample_rows=config.search_tokens)
    collector.linear_input(d.name, x)
    return _awq_round(config, d.module.weight, collector[d.name])


def _awq(
    model: nn.Module, config: AWQConfig, calibration: torch.Tensor | None, progress: bool, lifecycle: LayerLifecycle = RESIDENT
) -> QuantizationReport:
    run = _calibrated(model, config, calibration, "awq", _awq_layer, _awq_head, progress, lifecycle)
    return run.finish(
        {"grid": config.grid, "clip": config.clip, "search_tokens": config.search_tokens, "unrouted_weight": config.unrouted_weight}
    )


# ----------------------------------------------------------------------------- SmoothQuant + W8A8


@dataclass(frozen=True)
class W8A8Config:
    """INT8 weights (per-channel, symmetric) and INT8 activations, optionally smoothed first.

    Args:
        activations: ``DynamicPerToken()`` (scale per token at run time) or ``StaticPerTensor()``
            (one calibrated scale per module input; per expert for fused experts).
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

    def on_layer(prefix: str, layer: nn.Module, forward: Callable) -> None:
        linears = {d.name: d.module for d in _in_layer(decisions, prefix) if d.kind == "linear"}
        layer_counts = counts  # routed tokens are counted on the first pass only
        if config.smoothquant_alpha is not None:
            # unrouted_weight 0: an expert's statistics are over the tokens routed to it
            collector = _collect(layer, prefix, forward, linears, StatsCollector(unrouted_weight=0.0), layer_counts)
            _smooth_layer(config, prefix, layer, collector, quantized, smoothing)
            layer_counts = ExpertTokenCounts()
        if not isinstance(config.activations, StaticPerTensor):
            return
        collector = _collect(layer, prefix, forward, linears, StatsCollector(unrouted_weight=0.0), layer_counts)
        for d in _in_layer(decisions, prefix):
            if d.kind == "linear":
                absmax[d.name] = collector[d.name].abs_max.max()
            else:
                E = d.module.gate_up_proj.shape[0]
                absmax[f"{d.name}.gate_up_proj"] = torch.stack([collector[f"{d.name}.gate_up_proj.{e}"].abs_max.max() for e in range(E)])
                absmax[f"{d.name}.down_proj"] = torch.stack([collector[f"{d.name}.down_proj.{e}"].abs_max.max() for e in range(E)])

    sequential_calibrate(model, ids, on_layer, batch_size=config.batch_size, progress=progress)
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
    }
    for name, experts in starved.items():
        report.notes.append(
            f"{name}: expert(s) {experts} received no routed calibration token; "
            "their activation scale falls back to the layer's largest (finite) value"
        )
    return report


def needs_calibration(config: object) -> bool:
    """Whether ``quantize_(model, config)`` needs calibration token ids."""
    if isinstance(config, W8A8Config):
        return config.needs_calibration
    return isinstance(config, (GPTQConfig, AWQConfig))


register_handler(GPTQConfig, _gptq)
register_handler(AWQConfig, _awq)
register_handler(W8A8Config, _w8a8)
