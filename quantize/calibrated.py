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
from collections.abc import Sequence
from typing import Callable

import torch
from torch import nn

from dsq.core.errors import QuantizationError
from dsq.core.layout import decoder_layers
from dsq.core.ranks import current_ranks

from .api import QuantizationReport, check_finite, start_report, swap_decision
from .mappings import without_balance_notes
from .primitives import QuantizedWeight
from .scheme import WeightScheme
from .sequential import (
    ExpertTokenCounts, LayerLifecycle, observe_experts, observe_inputs,
    sequential_calibrate,
)
from .stats import StatsCollector
from .targets import TargetDecision, TargetSpec, select_targets


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
        self.ranks = current_ranks()  # several processes: each calibrates on its share of the batches
        self.done: set[str] = set()
        self.per_module: dict[str, dict] = {}
        self.without_balance: dict[str, str] = {}  # balance-based methods: module -> why it got no scale
        self.calibration = calibration

    def swap(self, decisions: list[TargetDecision], results: dict[str, QuantizedWeight]) -> None:
        for d in decisions:
            self.report.modules.append(swap_decision(self.model, d, _lookup(results), d.scheme_or(self.scheme).describe()))
            self.done.add(d.name)

    def head_decisions(self) -> list[TargetDecision]:
        return [d for d in self.decisions if d.name not in self.done]

    def finish(self, extra: dict) -> QuantizationReport:
        left = [d.name for d in self.decisions if d.name not in self.done and d.quantize]
        if left:
            raise QuantizationError(f"{self.method}: modules outside the decoder layers were not handled: {', '.join(left)}")
        samples, seq_len = self.calibration.shape
        self.counts.reduce(self.ranks)
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
        if self.without_balance:
            self.report.calibration["without_balance"] = dict(self.without_balance)
            self.report.notes += without_balance_notes(self.method, self.without_balance, decoder_layers(self.model)[0])
        return self.report


def _head_inputs(model: nn.Module, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """Input of ``lm_head``: the final norm of the last layer's output (``[samples, seq, hidden]`` on the model's device).

    DeepSeek-V4 first collapses its hyper-connection streams (``[samples, seq, hc_mult, hidden]``) with ``model.hc_head``.
    """
    base = getattr(model, "model", None)
    norm = getattr(base, "norm", None)
    if norm is None:
        raise QuantizationError(f"{type(model).__name__}: no final norm found (model.model.norm) for the lm_head stage")
    collapse = getattr(base, "hc_head", None)
    device = next(model.parameters()).device
    with torch.no_grad():
        last = torch.cat([h.to(device) for h in hidden])
        return norm(collapse(last) if collapse is not None else last)


# ----------------------------------------------------------------------------- GPTQ


def _stages(decisions: list[TargetDecision]) -> list[list[TargetDecision]]:
    """Attention modules first, then the MLP/MoE: the MLP is calibrated on the quantized attention's output."""
    attn = [d for d in decisions if ".self_attn." in d.name]
    rest = [d for d in decisions if ".self_attn." not in d.name]
    return [s for s in (attn, rest) if s]


LayerFn = Callable[["_Run", object, str, nn.Module, Callable], None]
HeadFn = Callable[["_Run", object, TargetDecision, torch.Tensor], QuantizedWeight]


def _calibrated(model: nn.Module, config, calibration: torch.Tensor | None, method: str, layer_fn: LayerFn, head_fn: HeadFn,
                progress: bool, lifecycle: LayerLifecycle, budget_bytes: int | None = None) -> _Run:
    """Run ``layer_fn`` over the decoder layers, then ``head_fn`` for targeted modules outside them.

    ``budget_bytes``: cached layer activations beyond it go to disk (:class:`~.activation_store.BatchStore`).
    """
    ids = require_calibration(calibration, method)
    run = _Run(model, config.targets, method, config.scheme, ids)
    hidden = sequential_calibrate(
        model, ids, lambda p, layer, fwd: layer_fn(run, config, p, layer, fwd), batch_size=config.batch_size, progress=progress,
        lifecycle=lifecycle, budget_bytes=budget_bytes, ranks=run.ranks,
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
