"""Learned rounding (``quantize.method: autoround``; SignRound, arXiv:2309.05516) on the layer-sequential driver.

Each decoder block is trained as a whole: its full-precision outputs on the inputs that come from
the already-quantized previous blocks are the target, and every targeted weight in it (attention
and MLA projections, dense MLPs, shared experts, each routed expert of the fused 3-D tensors) gets
a learned rounding offset and group clipping (:mod:`dsq.quantize.signround`). Routed experts learn
from the tokens routed to them; an expert with fewer than ``min_expert_tokens`` routed calibration
tokens is rounded to nearest with a searched range instead (or, with ``gptq_init``, keeps GPTQ's
integers), and the report names it. The trained
rounding is frozen into the integers dsq writes (the same compressed-tensors format as GPTQ's).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from dsq.core.schema import MAX_COUNT, Seed, Strict

from ..activation_store import BatchStore
from ..api import QuantizationReport
from ..artifact_save import save_quantized_model
from ..calibrated import _calibrated, _collect, _in_layer, _Run
from ..cost import STACKED_EXPERTS, BlockTraining, MethodCost, integer_layout
from ..gptq import static_qparams
from .gptq import GPTQConfig, gptq_solve, grouped_linears
from ..method import ALWAYS, Method, register
from ..primitives import QuantizedWeight, quantize_with_qparams
from ..scheme import PerGroup, WeightScheme
from ..sections import CalibrationSection, WeightMethodSection
from ..stats import StatsCollector
from ..sequential import (
    RESIDENT,
    ExpertTokenCounts,
    LayerInputs,
    LayerLifecycle,
    LayerRunner,
    first_tensor,
    fused_experts_in,
    run_layer,
)
from ..signround import (
    LearnedRounding,
    Schedule,
    attached,
    searched_clip,
    train_rounding,
)
from ..targets import TargetDecision, TargetSpec

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class AutoRoundConfig:
    """Learned rounding (SignRound, arXiv:2309.05516) weight-only quantization.

    Args:
        scheme: integer weight scheme (4/8 bits, per-channel or per-group, sym/asym).
        targets: which modules.
        steps: signed gradient steps per decoder block (one calibration batch each).
        lr: initial step size of the offsets and clipping factors; None: ``1 / steps``.
        learn_clipping: learn each group's range (else it stays where it starts).
        mse_init: each group's range starts from the shrink search GPTQ's ``mse_scales`` runs (else min/max).
        keep_best: end each block at the parameters of the step with the lowest batch loss (else the last).
        min_expert_tokens: a routed expert with fewer routed calibration tokens is rounded to nearest
            (searched range) instead of trained.
        seed: draws the batch of each step.
        batch_size: calibration sequences per forward and per step.
        cache_budget_bytes: a block's cached inputs, and its full-precision outputs, each beyond this many
            bytes go to disk (None: all in memory).
        gptq_init: each block starts from GPTQ's integers (Hessians of the block's inputs, the same ranges) instead of
            round-to-nearest; an expert below ``min_expert_tokens`` then keeps GPTQ's integers.
        full_precision_stream: a block's targets are the full-precision model's own outputs (the block in
            full precision on the full-precision stream), so each block also corrects the error of the blocks
            before it; else the full-precision block on the quantized stream's inputs.
    """

    scheme: WeightScheme = WeightScheme(4, PerGroup(128))
    targets: TargetSpec = TargetSpec()
    steps: int = 200
    lr: float | None = None
    learn_clipping: bool = True
    mse_init: bool = True
    keep_best: bool = True
    min_expert_tokens: int = 16
    seed: int = 0
    batch_size: int = 8
    cache_budget_bytes: int | None = None
    full_precision_stream: bool = True
    gptq_init: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.min_expert_tokens < 1:
            raise ValueError(f"min_expert_tokens must be >= 1, got {self.min_expert_tokens}")

    def schedule(self) -> Schedule:
        return Schedule(self.steps, self.lr if self.lr is not None else 1.0 / self.steps, self.keep_best)


@dataclass
class _State:
    """What persists across the blocks of one run."""

    generator: torch.Generator
    progress: bool
    counts: ExpertTokenCounts = field(default_factory=ExpertTokenCounts)
    fallback: dict[str, list[int]] = field(default_factory=dict)  # experts module -> experts rounded to nearest
    fp_hidden: BatchStore | None = None  # the full-precision model's input of the current block (after block 0)


Roundings = dict[str, tuple[nn.Module, str, LearnedRounding]]
"""Result key (``<module>.weight``, ``<experts>.gate_up_proj``) -> (module, parameter name, rounding)."""


def _roundings(decisions: list[TargetDecision], config: AutoRoundConfig) -> Roundings:
    out: Roundings = {}
    for d in decisions:
        attrs = EXPERT_PARAMS if d.kind == "experts" else ("weight",)
        for attr in attrs:
            weight = getattr(d.module, attr)
            clip = searched_clip(weight, config.scheme) if config.mse_init else None
            out[f"{d.name}.{attr}"] = (d.module, attr, LearnedRounding(weight, config.scheme, config.learn_clipping, clip))
    return out


@contextmanager
def _count_routed(layer: nn.Module, prefix: str, counts: ExpertTokenCounts) -> Iterator[None]:
    """Count the routed tokens of every fused expert of ``layer`` while inside."""
    handles = []
    for name, experts in fused_experts_in(layer, prefix).items():
        def hook(module, args, kwargs, name=name):
            top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            counts.add(name, top_k_index, module.gate_up_proj.shape[0])
        handles.append(experts.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _hold_starved(state: _State, config: AutoRoundConfig, decisions: list[TargetDecision], roundings: Roundings) -> None:
    """Experts below ``min_expert_tokens`` routed tokens are not trained; they are rounded to nearest at freeze."""
    for d in decisions:
        if d.kind != "experts":
            continue
        starved = [e for e, c in enumerate(state.counts.counts.get(d.name, [])) if c < config.min_expert_tokens]
        if starved:
            state.fallback[d.name] = starved
            for attr in EXPERT_PARAMS:
                roundings[f"{d.name}.{attr}"][2].trainable[starved] = False


@torch.no_grad()
def _freeze(roundings: Roundings, fallback: list[int], scheme: WeightScheme) -> dict[str, QuantizedWeight]:
    """The integers of every rounding; experts in ``fallback`` rounded to nearest with a searched range."""
    results = {}
    for key, (module, attr, rounding) in roundings.items():
        weight = getattr(module, attr).detach()
        qw = rounding.freeze(weight)
        for e in fallback if weight.dim() == 3 else ():
            rtn = quantize_with_qparams(weight[e], *static_qparams(weight[e].float(), scheme, mse=True), scheme)
            qw.qweight[e] = rtn.qweight
            qw.scale[e] = rtn.scale
            if qw.zero is not None:
                qw.zero[e] = rtn.zero
        results[key] = qw
    return results


def _block_loss(layer: nn.Module, runner: LayerRunner, targets: BatchStore, i: int) -> torch.Tensor:
    out = first_tensor(layer(runner.inputs.hidden[i], **runner.inputs.kwargs[i]))
    return F.mse_loss(out.float(), targets[i].float())


def _autoround_layer(state: _State, run: _Run, config: AutoRoundConfig, prefix: str, layer: nn.Module, runner: LayerRunner) -> None:
    decisions = _in_layer(run.decisions, prefix)
    quantized = [d for d in decisions if d.quantize]
    with _count_routed(layer, prefix, state.counts):
        targets = _targets(state, config, layer, runner)
    roundings = _roundings(quantized, config)
    if config.gptq_init:
        _start_at_gptq(run, config, prefix, layer, runner, quantized, roundings)
    _hold_starved(state, config, quantized, roundings)
    with attached(roundings):
        loss = train_rounding(partial(_block_loss, layer, runner, targets), len(targets), [r for _, _, r in roundings.values()],
                              config.schedule(), state.generator, desc=f"autoround {prefix}", progress=state.progress)
    run.per_module[prefix] = {**loss.to_dict(), "batches_on_disk": runner.inputs.hidden.spilled + targets.spilled}
    if not config.full_precision_stream:
        targets.close()
    results: dict[str, QuantizedWeight] = {}
    for d in quantized:
        own = {k: v for k, v in roundings.items() if k.startswith(d.name + ".")}
        rtn_experts = state.fallback.get(d.name, []) if d.kind == "experts" and not config.gptq_init else []
        results.update(_freeze(own, rtn_experts, config.scheme))
    run.swap(decisions, results)


def _gptq_config(config: AutoRoundConfig) -> GPTQConfig:
    """GPTQ with static groups and the rounding's own starting ranges (so its integers are a valid start)."""
    return GPTQConfig(config.scheme, config.targets, mse_scales=config.mse_init, act_order=True)


def _start_at_gptq(run: _Run, config: AutoRoundConfig, prefix: str, layer: nn.Module, runner: LayerRunner,
                   quantized: list[TargetDecision], roundings: Roundings) -> None:
    """Move every rounding's starting point to GPTQ's integers, solved from the block's own inputs."""
    gptq = _gptq_config(config)
    linears = {d.name: d.module for d in quantized if d.kind == "linear"}
    collector = StatsCollector(hessian=True, unrouted_weight=gptq.unrouted_weight, grouped=grouped_linears(quantized))
    has_experts = any(d.kind == "experts" for d in quantized)
    _collect(layer, prefix, lambda: runner().close(), linears, collector, ExpertTokenCounts() if has_experts else None)
    for key, qweight in gptq_solve(run, gptq, quantized, collector).items():
        module, attr, rounding = roundings[key]
        rounding.start_at(getattr(module, attr).detach(), qweight)


def _targets(state: _State, config: AutoRoundConfig, layer: nn.Module, runner: LayerRunner) -> BatchStore:
    """The block's full-precision outputs (``[batch, seq, hidden]`` per batch), before any of its weights is rounded."""
    if not config.full_precision_stream:
        return runner()  # on the quantized stream's inputs
    inputs = runner.inputs if state.fp_hidden is None else LayerInputs(state.fp_hidden, runner.inputs.kwargs)
    outputs = run_layer(layer, inputs, config.cache_budget_bytes)
    if state.fp_hidden is not None:
        state.fp_hidden.close()
    state.fp_hidden = outputs  # the next block's full-precision input
    return outputs


def _autoround_head(state: _State, run: _Run, config: AutoRoundConfig, d: TargetDecision, x: torch.Tensor) -> QuantizedWeight:
    """A Linear outside the decoder layers (``lm_head``) trained alone on its input ``x`` ``[samples, seq, hidden]``."""
    batches = x.split(config.batch_size)
    weight = d.module.weight.detach().clone()
    bias = d.module.bias

    def loss(i: int) -> torch.Tensor:
        with torch.no_grad():
            target = F.linear(batches[i], weight, bias)
        return F.mse_loss(d.module(batches[i]).float(), target.float())

    roundings = _roundings([d], config)
    if config.gptq_init:
        collector = StatsCollector(hessian=True)
        collector.linear_input(d.name, x)
        start = gptq_solve(run, _gptq_config(config), [d], collector)[f"{d.name}.weight"]
        roundings[f"{d.name}.weight"][2].start_at(weight, start)
    with attached(roundings):
        result = train_rounding(loss, len(batches), [r for _, _, r in roundings.values()], config.schedule(),
                                state.generator, desc=f"autoround {d.name}", progress=state.progress)
    run.per_module[d.name] = result.to_dict()
    return _freeze(roundings, [], config.scheme)[f"{d.name}.weight"]


def _autoround(
    model: nn.Module, config: AutoRoundConfig, calibration: torch.Tensor | None, progress: bool, lifecycle: LayerLifecycle = RESIDENT
) -> QuantizationReport:
    state = _State(generator=torch.Generator().manual_seed(config.seed), progress=progress)
    run = _calibrated(model, config, calibration, "autoround", partial(_autoround_layer, state), partial(_autoround_head, state),
                      progress, lifecycle, config.cache_budget_bytes)
    if state.fp_hidden is not None:
        state.fp_hidden.close()
    report = run.finish({
        "steps": config.steps, "lr": config.schedule().lr, "learn_clipping": config.learn_clipping, "mse_init": config.mse_init,
        "keep_best": config.keep_best,
        "seed": config.seed,
        "min_expert_tokens": config.min_expert_tokens, "cache_budget_bytes": config.cache_budget_bytes,
        "full_precision_stream": config.full_precision_stream, "gptq_init": config.gptq_init,
        "expert_routed_tokens": state.counts.counts, "experts_without_routed_tokens": state.counts.starved(),
        "experts_rounded_to_nearest": {} if config.gptq_init else state.fallback,
        "experts_kept_at_gptq": state.fallback if config.gptq_init else {},
        "expert_statistics": "routed tokens only (each expert learns from the tokens routed to it)",
    })
    for name, experts in state.fallback.items():
        counts = [state.counts.counts[name][e] for e in experts]
        report.notes.append(
            f"{name}: expert(s) {experts} got fewer than {config.min_expert_tokens} routed calibration tokens ({counts}); "
            + ("kept at GPTQ's integers (Hessians of every calibration token) instead of learned rounding" if config.gptq_init
               else "rounded to nearest with a searched range instead of learned rounding")
        )
    kept = [n for n, f in run.per_module.items() if isinstance(f, dict) and f.get("kept_rtn")]
    if kept:
        start = "GPTQ's integers" if config.gptq_init else "round-to-nearest"
        report.notes.append(f"autoround: training did not lower the output loss of {', '.join(kept)}; {start} kept there")
    return report


class AutoRoundSettings(Strict):
    steps: int = Field(200, ge=1, le=MAX_COUNT)  # signed gradient steps per decoder block
    lr: float | None = Field(None, gt=0, le=1)  # initial step size; None: 1 / steps (decays linearly to 0)
    learn_clipping: bool = True  # learn each group's range (else it stays where it starts)
    mse_init: bool = True  # ranges start from the shrink search of gptq.mse_scales (else min/max)
    keep_best: bool = True  # end each block at the step with the lowest batch loss (else the last step)
    min_expert_tokens: int = Field(16, ge=1, le=MAX_COUNT)  # fewer routed tokens: the expert is rounded to nearest
    seed: Seed = 0  # draws the calibration batch of each step
    cache_budget_mb: int | None = Field(None, ge=0, le=MAX_COUNT)  # a block's cached activations beyond it go to disk
    full_precision_stream: bool = True  # targets: the FP model's own outputs (false: the FP block on the quantized inputs)
    gptq_init: bool = False  # start each block from GPTQ's integers instead of round-to-nearest


class AutoRoundSection(WeightMethodSection):
    """``quantize:`` with ``method: autoround``."""

    method: Literal["autoround"] = "autoround"
    calibration: CalibrationSection = CalibrationSection()
    autoround: AutoRoundSettings = AutoRoundSettings()

    def config(self, dtype: torch.dtype = torch.float32) -> AutoRoundConfig:
        a = self.autoround
        return AutoRoundConfig(self.weights.scheme(), self.targets.spec(), steps=a.steps, lr=a.lr,
                               learn_clipping=a.learn_clipping, mse_init=a.mse_init, keep_best=a.keep_best, min_expert_tokens=a.min_expert_tokens, seed=a.seed,
                               batch_size=self.calibration.batch_size,
                               cache_budget_bytes=None if a.cache_budget_mb is None else a.cache_budget_mb << 20,
                               full_precision_stream=a.full_precision_stream, gptq_init=a.gptq_init)


def _autoround_calibration(config: AutoRoundConfig) -> BlockTraining:
    return BlockTraining(steps=config.steps, batch_size=config.batch_size)


AUTOROUND_COST = MethodCost(layout=integer_layout, calibration=_autoround_calibration, rounding=STACKED_EXPERTS)


AUTOROUND = register(Method(
    name="autoround", cost=AUTOROUND_COST, section=AutoRoundSection, config=AutoRoundConfig, handler=_autoround,
    save=save_quantized_model, calibrates=ALWAYS, streams=True, exports=True, qat_start=True, lora_base=True,
))
