"""Learned rounding by signed gradient descent (SignRound; Cheng et al., "Optimize Weight Rounding via
Signed Gradient Descent for the Quantization of LLMs", arXiv:2309.05516).

Each quantized weight ``W`` ``[..., out, in]`` gets a rounding offset ``V`` ``[..., out, in]`` in
``[-0.5, 0.5]`` and, per group, clipping factors in ``[CLIP_FLOOR, 1]`` that shrink the group's range:

    s = clip_max * amax / qmax                                  (symmetric)
    s = (clip_max * max - clip_min * min) / (qmax - qmin),
    z = qmin - round(clip_min * min / s)                        (asymmetric)
    W_hat = (clamp(round(W / s + V) + z, qmin, qmax) - z) * s

Rounding uses the straight-through estimator, so the block output loss has a gradient with
respect to ``V`` and the clipping factors. A whole decoder block is trained at once against its
full-precision outputs, one calibration batch per step, each parameter moved by
``lr * sign(grad)`` with ``lr`` decaying linearly to zero. With ``V = 0`` and the factors at 1 the
rounding is exactly round-to-nearest with min/max ranges, so training starts from RTN; the
frozen integers are ``clamp(round(W / s + V) + z)``, whose dequantized values equal ``W_hat``.

Example:
    >>> rounding = LearnedRounding(linear.weight, WeightScheme(4, PerGroup(32)), learn_clipping=True)
    >>> with attached({"w": (linear, "weight", rounding)}):
    ...     loss = train_rounding(step_loss, eval_loss, batches, [rounding], schedule, generator)
    >>> qweight = rounding.freeze(linear.weight)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from .gptq import static_qparams
from .primitives import QuantizedWeight, _pad_to_groups, compute_qparams, expand_groups
from .scheme import WeightScheme

CLIP_FLOOR = 0.5
"""Smallest clipping factor: a group's range never shrinks below half of its min/max range."""

_EPS = torch.finfo(torch.float32).tiny


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class LearnedRounding(nn.Module):
    """A parametrization ``W -> W_hat`` with learned rounding offsets and group clipping.

    Args:
        weight: the weight it will be attached to, ``[..., out, in]`` (leading dims: fused experts).
        scheme: the integer scheme (bits, granularity with ragged last groups, sym/asym).
        learn_clipping: train the clipping factors (else they stay where they start).
        clip: the starting clipping factors ``[..., out, groups]`` (None: 1, min/max ranges; see
            :func:`searched_clip`).
    """

    def __init__(self, weight: torch.Tensor, scheme: WeightScheme, learn_clipping: bool, clip: torch.Tensor | None = None) -> None:
        super().__init__()
        self.scheme = scheme
        grouped, _ = _pad_to_groups(weight.detach().float(), scheme)  # (..., out, groups, width)
        if scheme.symmetric:
            self.register_buffer("wmax", grouped.abs().amax(dim=-1))  # (..., out, groups)
            self.register_buffer("wmin", None)
        else:
            self.register_buffer("wmax", grouped.amax(dim=-1).clamp(min=0.0))
            self.register_buffer("wmin", grouped.amin(dim=-1).clamp(max=0.0))
        start = torch.ones(self.wmax.shape, device=weight.device) if clip is None else clip.to(weight.device, torch.float32)
        self.offset = nn.Parameter(torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))
        self.clip_max = nn.Parameter(start.clone(), requires_grad=learn_clipping)
        self.clip_min = None if scheme.symmetric else nn.Parameter(start.clone(), requires_grad=learn_clipping)
        self.register_buffer("trainable", torch.ones(weight.shape[:-2], dtype=torch.bool, device=weight.device))
        self.register_buffer("base", None)  # integer shift of the starting point [..., out, in] (see start_at)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scale, zero)`` ``[..., out, groups]``: fp32 scale, float zero point (integer valued) or None."""
        s = self.scheme
        if self.wmin is None:
            return (self.wmax * self.clip_max / s.qmax).clamp_min(_EPS), None
        wmin, wmax = self.wmin * self.clip_min, self.wmax * self.clip_max
        scale = ((wmax - wmin) / (s.qmax - s.qmin)).clamp_min(_EPS)
        zero = (s.qmin - round_ste(wmin / scale)).clamp(s.qmin, s.qmax)
        return scale, zero

    def integers(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(q, scale_expanded, zero_expanded)``: ``q = clamp(round(W / s + V) + z)`` as floats ``[..., out, in]``."""
        in_features = weight.shape[-1]
        scale, zero = self.qparams()
        s = expand_groups(scale, self.scheme, in_features)
        q = round_ste(weight.float() / s + self.offset)
        if self.base is not None:
            q = q + self.base
        z = None
        if zero is not None:
            z = expand_groups(zero, self.scheme, in_features)
            q = q + z
        return q.clamp(self.scheme.qmin, self.scheme.qmax), s, z

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        q, s, z = self.integers(weight)
        return ((q - z) * s if z is not None else q * s).to(weight.dtype)

    @torch.no_grad()
    def start_at(self, weight: torch.Tensor, start: QuantizedWeight) -> None:
        """Start from the integers of ``start`` (e.g. GPTQ's) instead of round-to-nearest.

        ``start`` must have this rounding's current scales (and zero points). A per-weight integer shift
        ``base = q_start - (round(W / s) + z)`` is added before clamping, so with ``V = 0`` the integers are
        ``q_start`` and each offset moves its weight between the same two neighbours as without the shift.
        """
        scale, zero = self.qparams()
        if not torch.allclose(start.scale.float(), scale, rtol=1e-6, atol=0.0):
            raise ValueError("start_at: the starting integers were made with other scales than this rounding's")
        if (zero is None) != (start.zero is None) or (zero is not None and not torch.equal(start.zero.float(), zero)):
            raise ValueError("start_at: the starting integers were made with other zero points than this rounding's")
        self.offset.zero_()
        unclamped = torch.round(weight.float() / expand_groups(scale, self.scheme, weight.shape[-1]))
        if zero is not None:
            unclamped = unclamped + expand_groups(zero, self.scheme, weight.shape[-1])
        self.base = start.qweight.float() - unclamped

    def _own(self) -> list[nn.Parameter]:
        return [p for p in (self.offset, self.clip_max, self.clip_min) if p is not None]

    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for p in self._own() if p.requires_grad]

    @torch.no_grad()
    def signed_step(self, lr: float) -> None:
        """``p -= lr * sign(grad)`` for every trained parameter of a trainable slice; then clamp to range."""
        for p in self.trained_parameters():
            if p.grad is None:
                continue
            mask = self.trainable.reshape(*self.trainable.shape, *([1] * (p.dim() - self.trainable.dim())))
            p.sub_(lr * torch.sign(p.grad) * mask)
            p.grad = None
        self.offset.clamp_(-0.5, 0.5)
        self.clip_max.clamp_(CLIP_FLOOR, 1.0)
        if self.clip_min is not None:
            self.clip_min.clamp_(CLIP_FLOOR, 1.0)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self._own()]

    @torch.no_grad()
    def restore(self, values: list[torch.Tensor]) -> None:
        for p, v in zip(self._own(), values):
            p.copy_(v)

    @torch.no_grad()
    def freeze(self, weight: torch.Tensor) -> QuantizedWeight:
        """The integers dsq writes: int8 ``q`` ``[..., out, in]``, fp32 scale and int8 zero ``[..., out, groups]``."""
        q, _, _ = self.integers(weight)
        scale, zero = self.qparams()
        return QuantizedWeight(q.to(torch.int8), scale.detach().clone(), None if zero is None else zero.to(torch.int8),
                               self.scheme)


def searched_clip(weight: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """Clipping factors ``[..., out, groups]`` of the range search (shrink 1.00 ... 0.80 of each group's min/max
    range by ``|w - Q(w)|^2.4``, the GPTQ reference quantizer's ``mse`` option) for ``weight`` ``[..., out, in]``."""
    if weight.dim() > 2:
        return torch.stack([searched_clip(w, scheme) for w in weight])
    w = weight.detach().float()
    searched, _ = static_qparams(w, scheme, mse=True)
    minmax, _ = compute_qparams(w, scheme)
    ratio = torch.where(minmax > _EPS, searched / minmax, torch.ones_like(minmax))
    return ratio.clamp(CLIP_FLOOR, 1.0)


@contextmanager
def attached(roundings: dict[str, tuple[nn.Module, str, LearnedRounding]]) -> Iterator[None]:
    """Parametrize ``module.attr`` by its rounding for every entry while inside; the float weights come back after.

    The modules' own parameters stop requiring gradients while inside (only the roundings train).
    """
    modules = {id(m): m for m, _, _ in roundings.values()}
    flags = {id(p): p.requires_grad for m in modules.values() for p in m.parameters()}
    for m in modules.values():
        m.requires_grad_(False)
    try:
        for module, attr, rounding in roundings.values():
            parametrize.register_parametrization(module, attr, rounding)
        yield
    finally:
        for module, attr, _ in roundings.values():
            if parametrize.is_parametrized(module, attr):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        for m in modules.values():
            for p in m.parameters():
                p.requires_grad_(flags.get(id(p), p.requires_grad))


@dataclass(frozen=True)
class Schedule:
    """Signed gradient descent settings.

    Attributes:
        steps: optimisation steps per block (one calibration batch each).
        lr: initial step size; decays linearly to 0 over ``steps``.
        keep_best: end at the parameters of the step with the lowest batch loss (else the last ones).
    """

    steps: int
    lr: float
    keep_best: bool = False

    def lr_at(self, step: int) -> float:
        return self.lr * (1 - step / self.steps)


@dataclass(frozen=True)
class BlockLoss:
    """Output loss (mean squared error against full precision over every calibration batch) of one block.

    Attributes:
        before: with round-to-nearest (the starting point).
        after: with the learned rounding that is kept.
        steps: optimisation steps taken.
        kept_initial: training did not lower the loss, so round-to-nearest was kept.
    """

    before: float
    after: float
    steps: int
    kept_initial: bool

    def to_dict(self) -> dict:
        return {"loss_before": self.before, "loss_after": self.after, "steps": self.steps, "kept_rtn": self.kept_initial}


BatchLoss = Callable[[int], torch.Tensor]
"""``loss(batch_index)``: the block's output loss on one calibration batch under the attached roundings."""


def _mean_loss(loss: BatchLoss, batches: int) -> float:
    with torch.no_grad(), parametrize.cached():
        return sum(float(loss(i)) for i in range(batches)) / batches


def train_rounding(loss: BatchLoss, batches: int, roundings: list[LearnedRounding], schedule: Schedule,
                   generator: torch.Generator, desc: str = "", progress: bool = False) -> BlockLoss:
    """Train ``roundings`` (attached to a block) to lower ``loss``; keep round-to-nearest if they do not.

    Args:
        loss: the block's output loss on a batch (computed with the attached roundings).
        batches: number of calibration batches.
        roundings: the block's learned roundings.
        schedule: steps and step size.
        generator: draws the batch of each step (a fixed seed gives the same roundings).
        desc: progress bar label (the block's name).
        progress: show a progress bar over the steps.

    Returns:
        The block's loss before and after, over every batch.
    """
    initial = [r.snapshot() for r in roundings]
    before = _mean_loss(loss, batches)
    order = torch.randint(batches, (schedule.steps,), generator=generator).tolist()
    best, best_loss = None, math.inf
    for step in tqdm(range(schedule.steps), desc=desc, disable=not progress, unit="step", leave=False):
        with torch.enable_grad(), parametrize.cached():
            value = loss(order[step])
            value.backward()
        if schedule.keep_best and float(value.detach()) < best_loss:  # the parameters this loss was computed with
            best_loss, best = float(value.detach()), [r.snapshot() for r in roundings]
        lr = schedule.lr_at(step)
        for r in roundings:
            r.signed_step(lr)
    if best is not None:
        for r, values in zip(roundings, best):
            r.restore(values)
    after = _mean_loss(loss, batches)
    if after >= before:
        for r, values in zip(roundings, initial):
            r.restore(values)
        return BlockLoss(before, before, schedule.steps, kept_initial=True)
    return BlockLoss(before, after, schedule.steps, kept_initial=False)
