"""Quantization-aware training: fake-quantized modules, straight-through estimator, convert.

``prepare_qat(model, config)`` swaps every target ``nn.Linear`` for :class:`FakeQuantLinear` and
every fused MoE experts module for :class:`FakeQuantExperts`. Their forward uses the weight
rounded exactly as the PTQ path rounds it, ``(clamp(round(w / s) + z) - z) * s``, with the
straight-through estimator for ``round`` (Bengio et al., 2013) so the fp32 latent weight
trains. ``convert_qat(model)`` then swaps them for dsq's :class:`QuantLinear` /
:class:`QuantExperts` built with the very same ``WeightScheme`` object, so a QAT model lands in
the same compressed-tensors artifact (and ONNX export) as a PTQ model, and the converted model's
logits equal the fake-quantized model's.

Where a module's scale comes from:

- from the FP base with ``learnable_scales=False``: min/max of the current latent weight at every
  forward (``compute_qparams``, the RTN rule), so at step 0 the model is exactly RTN;
- with ``learnable_scales=True``: a per-group scale parameter initialised from min/max and
  trained through the same estimator (LSQ, Esser et al., 2020, arXiv:1902.08153);
- from a PTQ result (a model already holding ``QuantLinear`` / ``QuantExperts``, e.g. after
  GPTQ): the latent weight starts at the dequantized weight and the scale at the stored one
  (frozen, or learnable), so at step 0 the model is exactly the PTQ artifact.

Example:
    >>> prepare_qat(model, QATConfig(WeightScheme(4, PerGroup(128))))
    >>> ...train...
    >>> report = convert_qat(model)          # QuantLinear / QuantExperts, same scheme
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsq.core.errors import QuantizationError
from dsq.quantize.gptq import static_qparams
from dsq.quantize.api import ModuleRecord, QuantizationReport, check_finite, start_report, tensor_bytes
from dsq.quantize.modules import GatedActivation, QuantExperts, QuantLinear, apply_linear, linear_groups, route_tokens, set_module
from dsq.quantize.primitives import QuantizedWeight, compute_qparams, expand_groups, quantize_with_qparams
from dsq.quantize.scheme import PerGroup, WeightScheme
from dsq.quantize.targets import TargetDecision, TargetSpec, select_targets


@dataclass(frozen=True)
class QATConfig:
    """Fake-quantization for training; ``convert_qat`` uses the same ``scheme``.

    Args:
        scheme: the integer weight scheme the converted model will have.
        targets: which modules (same rules as PTQ: router and norms always kept, lm_head opt-in).
        learnable_scales: train a per-group scale (LSQ) instead of taking min/max each step.
        mse_init: start learnable scales from the range search that minimises ``|w - Q(w)|^2.4``
            per group (as GPTQ's ``mse_scales``; LSQ+ initialises by error minimisation too,
            Bhalgat et al., 2020, arXiv:2004.09576) instead of min/max.
    """

    scheme: WeightScheme = WeightScheme(4, PerGroup(128))
    targets: TargetSpec = TargetSpec()
    learnable_scales: bool = False
    mse_init: bool = False


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity gradient (straight-through estimator)."""
    return x + (x.round() - x).detach()


def fake_quantize_ste(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: WeightScheme) -> torch.Tensor:
    """``dequantize(quantize_with_qparams(w, scale, zero))`` with gradients for ``w`` and ``scale``.

    ``w`` ``[..., out, in]`` fp32, ``scale`` ``[..., out, groups]``; bit-identical in value to the
    PTQ path's rounding, so the converted model computes exactly what training saw.
    """
    in_features = w.shape[-1]
    s = expand_groups(scale, scheme, in_features)  # (..., out, in)
    q = round_ste(w / s)
    if zero is not None:
        z = expand_groups(zero, scheme, in_features).to(q.dtype)
        return clamp_ste(q + z, scheme.qmin, scheme.qmax).sub(z).mul(s)
    return clamp_ste(q, scheme.qmin, scheme.qmax).mul(s)


def clamp_ste(q: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``q.clamp(qmin, qmax)`` whose gradient is 1 inside the range, bounds included, and 0 outside.

    ``torch.clamp``'s own gradient at a bound changed between torch releases (2.14 gives 0 there); a
    group's largest weight sits exactly on the bound under min/max scales and must keep its gradient.
    """
    inside = (q >= qmin) & (q <= qmax)
    return torch.where(inside, q, q.detach().clamp(qmin, qmax))


class _FakeQuantWeight(nn.Module):
    """Scale source of one fake-quantized weight: min/max each call, or a stored (learnable) scale."""

    def __init__(self, scheme: WeightScheme, scale: torch.Tensor | None, zero: torch.Tensor | None, learnable: bool) -> None:
        super().__init__()
        self.scheme = scheme
        self.scale = None if scale is None else nn.Parameter(scale.detach().float().clone(), requires_grad=learnable)
        self.register_buffer("zero", None if zero is None else zero.detach().clone())

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.scale is None:
            return compute_qparams(w.detach(), self.scheme)  # the RTN rule, recomputed as w trains
        return self.scale.clamp_min(torch.finfo(torch.float32).tiny), self.zero

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale, zero = self.qparams(w)
        return fake_quantize_ste(w.float(), scale, zero, self.scheme).to(w.dtype)

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        """The integer weight ``convert_qat`` stores: same parameters as the forward."""
        scale, zero = self.qparams(w)
        return quantize_with_qparams(w.detach().float(), scale.detach(), zero, self.scheme)


def _initial_qparams(weight: torch.Tensor, config: QATConfig):
    """Stored starting scales ``[..., out, groups]`` (None: min/max recomputed every step)."""
    if not config.learnable_scales:
        return None, None
    w = weight.detach().float()
    if not config.mse_init:
        return compute_qparams(w, config.scheme)
    parts = [static_qparams(m, config.scheme, mse=True) for m in w.reshape(-1, *w.shape[-2:])]  # per expert
    scale = torch.stack([p[0] for p in parts]).reshape(*w.shape[:-1], -1)
    zero = torch.stack([p[1] for p in parts]).reshape(scale.shape) if parts[0][1] is not None else None
    return scale, zero


class FakeQuantLinear(nn.Module):
    """``nn.Linear`` whose forward uses the fake-quantized latent weight ``weight`` ``(out, in)``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fq: _FakeQuantWeight, n_groups: int | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.fq = fq
        self.n_groups = n_groups  # DeepSeek-V4's grouped o_a_proj (see dsq.quantize.modules.apply_linear)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QATConfig) -> "FakeQuantLinear":
        scale, zero = _initial_qparams(linear.weight, config)
        return cls(linear.weight, linear.bias, _FakeQuantWeight(config.scheme, scale, zero, config.learnable_scales),
                   linear_groups(linear))

    @classmethod
    def from_quantized(cls, q: QuantLinear, learnable: bool) -> "FakeQuantLinear":
        t = q.weight_q
        fq = _FakeQuantWeight(q.scheme, t.scale, t.zero_point, learnable)
        return cls(t.dequantize(torch.float32), q.bias, fq, q.n_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(x, self.fq(self.weight).to(x.dtype), self.bias, self.n_groups)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fq.scheme.describe()}"


class FakeQuantExperts(nn.Module):
    """Fused MoE experts (``gate_up_proj`` ``(E, 2I, H)``, ``down_proj`` ``(E, H, I)``) with fake-quantized weights.

    Same call signature as transformers' experts: ``(hidden (tokens, H), top_k_index, top_k_weights)``.
    """

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, glu: GatedActivation, fq_gate_up: _FakeQuantWeight,
                 fq_down: _FakeQuantWeight) -> None:
        super().__init__()
        self.num_experts = gate_up.shape[0]
        self.gate_up_proj = nn.Parameter(gate_up.detach().clone())
        self.down_proj = nn.Parameter(down.detach().clone())
        self.glu = glu
        self.fq_gate_up = fq_gate_up
        self.fq_down = fq_down

    @classmethod
    def from_experts(cls, experts: nn.Module, config: QATConfig) -> "FakeQuantExperts":
        fqs = []
        for w in (experts.gate_up_proj, experts.down_proj):
            scale, zero = _initial_qparams(w, config)
            fqs.append(_FakeQuantWeight(config.scheme, scale, zero, config.learnable_scales))
        return cls(experts.gate_up_proj, experts.down_proj, GatedActivation.of(experts), *fqs)

    @classmethod
    def from_quantized(cls, q: QuantExperts, learnable: bool) -> "FakeQuantExperts":
        tensors = (q.gate_up_proj, q.down_proj)
        fqs = [_FakeQuantWeight(t.scheme, t.scale, t.zero_point, learnable) for t in tensors]
        return cls(*(t.dequantize(torch.float32) for t in tensors), q.glu, *fqs)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        gate_up = self.fq_gate_up(self.gate_up_proj).to(hidden_states.dtype)  # (E, 2I, H)
        down = self.fq_down(self.down_proj).to(hidden_states.dtype)  # (E, H, I)

        def expert_forward(expert: int, x: torch.Tensor) -> torch.Tensor:  # (n, H) -> (n, H)
            gate, up = F.linear(x, gate_up[expert]).chunk(2, dim=-1)
            return F.linear(self.glu(gate, up), down[expert])

        return route_tokens(hidden_states, top_k_index, top_k_weights, self.num_experts, expert_forward)


FAKE_QUANT_MODULES = (FakeQuantLinear, FakeQuantExperts)


def _check_scheme(name: str, scheme: WeightScheme, config: QATConfig) -> None:
    if scheme != config.scheme:
        raise QuantizationError(
            f"{name} was quantized as {scheme.describe()} but QAT was asked for {config.scheme.describe()}; "
            "QAT from a PTQ result keeps the PTQ scheme"
        )


def prepare_qat(model: nn.Module, config: QATConfig) -> list[str]:
    """Swap target modules for fake-quantized ones in place; returns their names.

    Modules already quantized by PTQ (``QuantLinear`` / ``QuantExperts``) start from their
    dequantized weights and stored scales; plain ones follow ``config.targets``.
    """
    names = []
    for name, module in list(model.named_modules()):
        new = None
        if isinstance(module, QuantLinear):
            _check_scheme(name, module.scheme, config)
            new = FakeQuantLinear.from_quantized(module, config.learnable_scales)
        elif isinstance(module, QuantExperts):
            _check_scheme(name, module.gate_up_proj.scheme, config)
            new = FakeQuantExperts.from_quantized(module, config.learnable_scales)
        if new is not None:
            set_module(model, name, new)
            names.append(name)
    for d in select_targets(model, config.targets):
        if not d.quantize or isinstance(d.module, FAKE_QUANT_MODULES):  # fake experts look fused (3-D weights)
            continue
        new = FakeQuantLinear.from_linear(d.module, config) if d.kind == "linear" else FakeQuantExperts.from_experts(d.module, config)
        set_module(model, d.name, new)
        names.append(d.name)
    if not names:
        raise QuantizationError("QAT found no module to fake-quantize: check quantize.targets")
    if config.mse_init and not config.learnable_scales:
        raise QuantizationError("QAT mse_init needs learnable_scales (min/max scales are recomputed every step)")
    return names


def fake_quant_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FAKE_QUANT_MODULES)}


def _convert_one(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    if isinstance(module, FakeQuantLinear):
        qw = module.fq.quantize(module.weight)
        check_finite(f"{name}.weight", qw)
        bias = None if module.bias is None else module.bias.detach()
        new = QuantLinear(qw, bias, scale_dtype=module.weight.dtype, n_groups=module.n_groups)
    else:
        gate_up = module.fq_gate_up.quantize(module.gate_up_proj)
        down = module.fq_down.quantize(module.down_proj)
        check_finite(f"{name}.gate_up_proj", gate_up)
        check_finite(f"{name}.down_proj", down)
        new = QuantExperts(gate_up, down, GatedActivation.of(module), scale_dtype=module.gate_up_proj.dtype)
    set_module(model, name, new)
    return new


def _weight_params(module: nn.Module) -> int:
    if isinstance(module, FakeQuantLinear):
        return module.weight.numel() + (0 if module.bias is None else module.bias.numel())
    return module.gate_up_proj.numel() + module.down_proj.numel()


def convert_qat(model: nn.Module, *, method: str = "qat") -> QuantizationReport:
    """Replace every fake-quantized module by dsq's packed module with the same scheme.

    Returns:
        The same :class:`QuantizationReport` a PTQ run gives (every parameter accounted for),
        with method ``method``; modules the targets kept are listed with their reason.
    """
    fakes = fake_quant_modules(model)
    if not fakes:
        raise QuantizationError("convert_qat: the model has no fake-quantized module (was prepare_qat called?)")
    schemes = {m.fq.scheme if isinstance(m, FakeQuantLinear) else m.fq_gate_up.scheme for m in fakes.values()}
    kept = [d for d in select_targets(model, TargetSpec()) if d.name not in fakes]
    decisions = [TargetDecision(n, m, "linear" if isinstance(m, FakeQuantLinear) else "experts", True, "quantized")
                 for n, m in fakes.items()]
    scheme_text = " + ".join(sorted(s.describe() for s in schemes))
    report = start_report(model, decisions + kept, method=method, scheme=scheme_text)
    for d in decisions:
        params = _weight_params(d.module)
        before = tensor_bytes(d.module)
        new = _convert_one(model, d.name, d.module)
        report.modules.append(ModuleRecord(d.name, d.kind, True, "quantization-aware trained", params, before,
                                           tensor_bytes(new), scheme_text))
    for d in kept:
        size = tensor_bytes(d.module)
        params = sum(p.numel() for p in d.module.parameters())
        reason = d.reason if not d.quantize else "not fake-quantized during QAT"
        report.modules.append(ModuleRecord(d.name, d.kind, False, reason, params, size, size))
    return report
