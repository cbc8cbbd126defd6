"""The public verb: ``quantize_(model, config)`` dispatches on the config's type.

A new method is one module under :mod:`dsq.quantize.methods` registering a
:class:`~dsq.quantize.method.Method` (config class, handler, recipe section); there are no mode strings. Every handler returns a :class:`QuantizationReport` that accounts for every
parameter of the model: what was quantized and what was kept, in parameters and bytes.

Example:
    >>> report = quantize_(model, RTNConfig(WeightScheme(4, PerGroup(128))))
    >>> report.quantized_params, report.kept_params
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from dsq.core.errors import QuantizationError

from .modules import GatedActivation, QuantExperts, QuantLinear, QuantTensor, set_module
from .primitives import QuantizedWeight
from .scheme import WeightScheme
from .sequential import RESIDENT, LayerLifecycle, decoder_layers
from .targets import TargetDecision, TargetSpec, select_targets


@dataclass(frozen=True)
class ModuleRecord:
    """One module's outcome in a quantization report."""

    name: str
    kind: str
    quantized: bool
    reason: str
    params: int
    bytes_before: int
    bytes_after: int
    scheme: str | None = None
    # Weight SQNR in dB, 10 log10(|W|^2 / |W - dequant(Q(W))|^2), of the float weight the module was
    # quantized from (after any AWQ / SmoothQuant folding) against the stored quantized weight, in fp32.
    # Fused experts: over every expert's gate_up and down tensors together. None: not quantized by a
    # method that measures it (kept modules, bitsandbytes); inf: reproduced exactly.
    sqnr_db: float | None = None
    # Fused experts only: per expert, the lower of its gate_up and down SQNRs (dB).
    expert_sqnr_db: list[float] | None = None


@dataclass
class QuantizationReport:
    """What a quantization run did to every parameter of the model."""

    method: str
    scheme: str
    modules: list[ModuleRecord] = field(default_factory=list)
    other_params: int = 0  # embeddings, norms, router, ... never quantizable
    other_bytes: int = 0
    other_breakdown: dict[str, int] = field(default_factory=dict)  # category -> parameters
    calibration: dict | None = None  # calibrated methods: data, per-expert token counts, per-module search results
    notes: list[str] = field(default_factory=list)  # things the user must know (e.g. starved experts)

    @property
    def quantized(self) -> list[ModuleRecord]:
        return [m for m in self.modules if m.quantized]

    @property
    def kept(self) -> list[ModuleRecord]:
        return [m for m in self.modules if not m.quantized]

    @property
    def quantized_params(self) -> int:
        return sum(m.params for m in self.quantized)

    @property
    def kept_params(self) -> int:
        return sum(m.params for m in self.kept) + self.other_params

    def to_dict(self) -> dict:
        q_before = sum(m.bytes_before for m in self.quantized)
        q_after = sum(m.bytes_after for m in self.quantized)
        return {
            "method": self.method,
            "scheme": self.scheme,
            "quantized_modules": len(self.quantized),
            "kept_modules": len(self.kept),
            "quantized_params": self.quantized_params,
            "kept_params": self.kept_params,
            "quantized_bytes_before": q_before,
            "quantized_bytes_after": q_after,
            "quantized_fp16_bytes": 2 * self.quantized_params,
            "quantized_bytes_ratio_vs_fp16": q_after / max(1, 2 * self.quantized_params),
            "kept_bytes": sum(m.bytes_after for m in self.kept) + self.other_bytes,
            "never_quantized_params": self.other_breakdown,
            "kept": [
                {"name": m.name, "kind": m.kind, "params": m.params, "reason": m.reason} for m in self.kept
            ],
            "modules": [_finite_floats(asdict(m)) for m in self.modules],
            "calibration": self.calibration,
            "notes": list(self.notes),
        }


def _finite_floats(record: dict) -> dict:
    """A module record with non-finite SQNRs (an exact or all-zero weight) as ``None``: strict JSON."""
    def finite(x: object) -> object:
        return x if not isinstance(x, float) or math.isfinite(x) else None

    out = dict(record, sqnr_db=finite(record.get("sqnr_db")))
    if out.get("expert_sqnr_db") is not None:
        out["expert_sqnr_db"] = [finite(x) for x in out["expert_sqnr_db"]]
    return out


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's own parameters and buffers (recursively)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def check_finite(name: str, qw: QuantizedWeight) -> None:
    """Fail naming the tensor if a scale is NaN, inf or not positive."""
    bad = ~torch.isfinite(qw.scale) | (qw.scale <= 0)
    if bad.any():
        raise QuantizationError(f"{name}: {int(bad.sum())} scale(s) are NaN, inf or <= 0; refusing to save")


WeightQuantizer = Callable[[str, torch.Tensor], QuantizedWeight]


def swap_linear(model: nn.Module, d: TargetDecision, quantizer: WeightQuantizer) -> nn.Module:
    linear: nn.Linear = d.module
    qw = quantizer(f"{d.name}.weight", linear.weight.detach())
    new = QuantLinear.from_linear(linear, qw)
    set_module(model, d.name, new)
    return new


def swap_experts(model: nn.Module, d: TargetDecision, quantizer: WeightQuantizer) -> nn.Module:
    experts = d.module
    gate_up = quantizer(f"{d.name}.gate_up_proj", experts.gate_up_proj.detach())  # (E, 2I, H)
    down = quantizer(f"{d.name}.down_proj", experts.down_proj.detach())  # (E, H, I)
    new = QuantExperts(gate_up, down, GatedActivation.of(experts), scale_dtype=experts.gate_up_proj.dtype)
    set_module(model, d.name, new)
    return new


def start_report(model: nn.Module, decisions: list[TargetDecision], *, method: str, scheme: str) -> QuantizationReport:
    """An empty report whose never-quantizable part (embeddings, norms, router) is filled in."""
    report = QuantizationReport(method=method, scheme=scheme)
    covered_params = sum(sum(p.numel() for p in d.module.parameters()) for d in decisions)
    report.other_params = sum(p.numel() for p in model.parameters()) - covered_params
    report.other_bytes = tensor_bytes(model) - sum(tensor_bytes(d.module) for d in decisions)
    report.other_breakdown = _other_breakdown(model, {d.name for d in decisions})
    return report


def _noise_and_signal(weight: torch.Tensor, quantized: QuantTensor, index: int | None = None) -> tuple[float, float]:
    """``(|W - dequant(Q)|^2, |W|^2)`` in fp32 of one weight (or of expert ``index`` of a stacked one)."""
    w = (weight if index is None else weight[index]).detach().float()
    noise = (w - quantized.dequantize(torch.float32, index).to(w.device)).pow(2).sum()
    return float(noise), float(w.pow(2).sum())


def _db(noise: float, signal: float) -> float:
    """``10 log10(signal / noise)``; ``inf`` without noise, ``-inf`` for noise on an all-zero weight."""
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10 * math.log10(signal / noise)


@torch.no_grad()
def module_sqnr(old: nn.Module, new: nn.Module) -> tuple[float | None, list[float] | None]:
    """Weight SQNR (dB) of a quantized module against the float module it replaced.

    ``old`` is an ``nn.Linear`` (``weight``) or fused experts (``gate_up_proj`` [E, 2I, H],
    ``down_proj`` [E, H, I]); ``new`` holds the matching :class:`QuantTensor` s (``weight_q``, or
    ``gate_up_proj`` / ``down_proj``). Computed in fp32 one weight (one expert) at a time.

    Returns:
        ``(sqnr_db, expert_sqnr_db)``: the whole module's SQNR (every expert's tensors pooled), and
        for experts the per-expert minimum over gate_up and down (``None`` for a Linear).
        ``(None, None)`` when the float weights are no longer held (meta tensors).
    """
    if any(p.device.type == "meta" for p in old.parameters()):
        return None, None
    if isinstance(getattr(new, "weight_q", None), QuantTensor):
        return _db(*_noise_and_signal(old.weight, new.weight_q)), None
    total_noise = total_signal = 0.0
    per_expert = []
    for e in range(old.gate_up_proj.shape[0]):
        gate_up = _noise_and_signal(old.gate_up_proj, new.gate_up_proj, e)
        down = _noise_and_signal(old.down_proj, new.down_proj, e)
        per_expert.append(min(_db(*gate_up), _db(*down)))
        total_noise += gate_up[0] + down[0]
        total_signal += gate_up[1] + down[1]
    return _db(total_noise, total_signal), per_expert


def swap_decision(model: nn.Module, d: TargetDecision, quantizer: WeightQuantizer, scheme: str) -> ModuleRecord:
    """Quantize one selected module with ``quantizer`` (or record why it is kept)."""
    params = sum(p.numel() for p in d.module.parameters())
    before = tensor_bytes(d.module)
    if not d.quantize:
        return ModuleRecord(d.name, d.kind, False, d.reason, params, before, before)
    swap = swap_linear if d.kind == "linear" else swap_experts
    new = swap(model, d, quantizer)
    sqnr, expert_sqnr = module_sqnr(d.module, new)
    return ModuleRecord(d.name, d.kind, True, d.reason, params, before, tensor_bytes(new), scheme, sqnr, expert_sqnr)


def apply_weight_quantizer(
    model: nn.Module, targets: TargetSpec, quantizer: WeightQuantizer, *, method: str, scheme: WeightScheme, progress: bool = True,
    lifecycle: LayerLifecycle = RESIDENT,
) -> QuantizationReport:
    """Swap every selected module for its quantized version using ``quantizer`` for the math.

    Decoder layers are visited in order, each loaded and released through ``lifecycle`` (so a
    streaming run holds one layer at a time); modules outside the layers come last.
    """
    decisions = select_targets(model, targets)
    report = start_report(model, decisions, method=method, scheme=scheme.describe())
    bar = tqdm(total=len(decisions), desc=f"quantize ({method})", disable=not progress, unit="module")
    by_layer, outside = _group_by_layer(model, decisions)
    for index, (name, layer, layer_decisions) in enumerate(by_layer):
        lifecycle.load(index, name, layer)
        for d in layer_decisions:
            report.modules.append(swap_decision(model, d, quantizer, d.scheme_or(scheme).describe()))
            bar.update()
        lifecycle.release(index, name, layer)
    for d in outside:
        report.modules.append(swap_decision(model, d, quantizer, d.scheme_or(scheme).describe()))
        bar.update()
    bar.close()
    return report


def _group_by_layer(
    model: nn.Module, decisions: list[TargetDecision]
) -> tuple[list[tuple[str, nn.Module, list[TargetDecision]]], list[TargetDecision]]:
    """Decisions per decoder layer (every layer listed, in order) and those outside the layers."""
    try:
        prefix, layers = decoder_layers(model)
    except QuantizationError:  # a bare module without decoder layers
        return [], decisions
    groups = [(f"{prefix}.{i}", layer, []) for i, layer in enumerate(layers)]
    outside = []
    for d in decisions:
        head, _, rest = d.name.partition(prefix + ".")
        index = rest.split(".", 1)[0]
        if head == "" and index.isdigit():
            groups[int(index)][2].append(d)
        else:
            outside.append(d)
    return groups, outside


_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("embeddings", ("embed",)),
    ("hyper_connections", (".attn_hc.", ".ffn_hc.", "hc_head.")),  # DeepSeek-V4 mHC mixing (fn, base, scale)
    ("attention_sinks", (".sinks",)),  # DeepSeek-V4 per-head sink logits
    ("position_biases", ("position_bias",)),  # DeepSeek-V4 compressor / indexer
    ("hash_table", ("tid2eid",)),  # DeepSeek-V4 hash router: token id -> experts (integers)
    ("norms", ("norm",)),
    ("router", (".gate.",)),
)
"""Categories of the tensors dsq never quantizes, first match wins (substrings of the state-dict name)."""


def _category(param_name: str) -> str:
    for category, parts in _CATEGORIES:
        if any(part in param_name for part in parts):
            return category
    return "other"


def _other_breakdown(model: nn.Module, covered: set[str]) -> dict[str, int]:
    """Elements of the tensors outside quantizable modules (parameters and saved buffers), by category."""
    counts: dict[str, int] = {}
    for name, p in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if any(owner == c or owner.startswith(c + ".") for c in covered):
            continue
        key = _category(name)
        counts[key] = counts.get(key, 0) + p.numel()
    return counts


def require_resident(lifecycle: LayerLifecycle, method: str) -> None:
    """Fail for a method that needs the whole model in memory when the layers are streamed."""
    if not lifecycle.resident:
        from .method import method_names

        raise QuantizationError(
            f"{method} needs the whole model in memory; streaming (one layer at a time) supports "
            f"{', '.join(method_names(lambda m: m.streams))}"
        )


def quantize_(
    model: nn.Module, config: object, *, calibration: torch.Tensor | None = None, progress: bool = True,
    lifecycle: LayerLifecycle = RESIDENT,
) -> QuantizationReport:
    """Quantize ``model`` in place according to ``config``.

    Args:
        model: a transformers causal LM (or any module with Linears / fused experts).
        config: a registered method's config, e.g. ``RTNConfig``, ``GPTQConfig``, ``AWQConfig``.
        calibration: ``(samples, seq_len)`` token ids; required by calibrated methods.
        progress: show a progress bar.
        lifecycle: how decoder layers are loaded and released (default: all resident); the
            streaming runner passes one that reads each layer from the shards and writes it out.

    Returns:
        A :class:`QuantizationReport` listing every quantizable module and what happened to it.

    Raises:
        QuantizationError: inside a process group of several ranks, a method that cannot split its
            calibration (each rank would quantize on different data); per-module scheme rules for a method
            that has one scheme.

    With a ``torch.distributed`` process group initialized, every rank calls this on the same model and
    calibration ids; each calibrates on its share of the batches and all end with the same weights.
    """
    from dsq.core.ranks import current_ranks

    from .method import method_of, mixed_refusal, split_refusal

    ranks = current_ranks()
    if ranks.several and (refusal := split_refusal(config, ranks.world)):
        raise QuantizationError(refusal)
    if refusal := mixed_refusal(config):
        raise QuantizationError(refusal)
    return method_of(config).handler(model, config, calibration, progress, lifecycle)


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> QuantLinear / QuantExperts of a quantized model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantExperts))}


__all__ = [
    "QuantizationReport",
    "ModuleRecord",
    "quantize_",
    "quantized_modules",
    "QuantTensor",
]
