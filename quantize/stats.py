"""Calibration statistics of module inputs, accumulated in fp32 (sums in fp64) whatever the model's dtype.

One :class:`InputStats` per observed input: mean and max ``|x|`` per channel, optionally the
GPTQ Hessian, and a bounded sample of rows for searches (AWQ). :class:`StatsCollector` feeds
them from Linear forward hooks and from :class:`~.sequential.ObservedExperts`. Keys are
module names; fused experts use ``NAME.gate_up_proj`` (shared input of every expert) and
``NAME.gate_up_proj.E`` / ``NAME.down_proj.E`` (expert ``E``'s input and ``act(gate) * up``).

Each forward call's contribution (``X^T W X``, ``sum w |x|``) is computed in fp32 and added to fp64
sums, so the totals do not depend on the order the calls are added in (the fp32 products are exact in
fp64, and their sums round far below fp32 resolution): calibration split over several processes
(:meth:`StatsCollector.reduce`) gives the Hessians of one process, and the same integers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsq.core.errors import QuantizationError
from dsq.core.ranks import SINGLE, Ranks

def max_over_median(magnitude: torch.Tensor) -> float:
    """``max / median`` of per-channel magnitudes ``(C,)``: about 1-5 without outlier channels, 10-100+ in large LLMs."""
    return float(magnitude.max() / magnitude.median().clamp_min(1e-12))


@dataclass
class InputStats:
    """Running statistics of one module input ``(..., C)``."""

    count: float = 0.0  # total row weight
    abs_sum: torch.Tensor | None = None  # (C,) fp64, weighted
    abs_max: torch.Tensor | None = None  # (C,) fp32, over rows of positive weight
    hessian_sum: torch.Tensor | None = None  # (C, C) fp64, X^T W X
    samples: list[torch.Tensor] = field(default_factory=list)  # rows kept for searches

    def add(self, x: torch.Tensor, *, hessian: bool, sample_rows: int, weights: torch.Tensor | None = None,
            channels: bool = True) -> None:
        """Fold rows ``x`` ``(..., C)``; ``weights`` ``(rows,)`` down-weights rows (e.g. unrouted tokens); without
        ``channels`` the per-channel sum and max of ``|x|`` are not kept (GPTQ needs only the Hessian)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        w = torch.ones(x.shape[0], device=x.device) if weights is None else weights.reshape(-1).to(torch.float32)
        if channels:
            self._add_channels(x, w)
        if hessian:
            xw = x * w.sqrt().unsqueeze(1) if weights is not None else x
            gram = (xw.t() @ xw).double()  # (C, C): fp32 products, summed in fp64 from here on
            self.hessian_sum = gram if self.hessian_sum is None else self.hessian_sum.add_(gram)
        self.count += float(w.double().sum())
        if sample_rows > 0 and x.shape[0]:
            # prefer the rows that matter most (full weight), then fill with the others
            heavy = torch.nonzero(w >= w.max()).reshape(-1)
            light = torch.nonzero(w < w.max()).reshape(-1)
            pick = heavy[:: max(1, heavy.shape[0] // sample_rows)][:sample_rows]
            if pick.shape[0] < sample_rows and light.shape[0]:
                need = sample_rows - pick.shape[0]
                pick = torch.cat([pick, light[:: max(1, light.shape[0] // need)][:need]])
            self.samples.append(x[pick].clone())

    def _add_channels(self, x: torch.Tensor, w: torch.Tensor) -> None:
        a = x.abs()
        weighted_sum = (a * w.unsqueeze(1)).sum(0).double()
        kept = a[w > 0]
        row_max = kept.amax(0) if kept.shape[0] else torch.zeros(x.shape[-1], device=x.device)
        if self.abs_sum is None:
            self.abs_sum, self.abs_max = weighted_sum, row_max
        else:
            self.abs_sum += weighted_sum
            self.abs_max = torch.maximum(self.abs_max, row_max)

    @property
    def device(self) -> torch.device:
        kept = self.hessian_sum if self.hessian_sum is not None else self.abs_sum
        return kept.device

    @property
    def hessian(self) -> torch.Tensor:
        """GPTQ's ``H = 2/n X^T W X`` ``(C, C)`` in fp32 (zeros when no row had weight)."""
        if self.hessian_sum is None:
            raise QuantizationError("no Hessian was collected for this input")
        if self.count <= 0:
            return torch.zeros(self.hessian_sum.shape, dtype=torch.float32, device=self.hessian_sum.device)
        return (self.hessian_sum * (2.0 / self.count)).float()

    @property
    def mean_abs(self) -> torch.Tensor:
        """Weighted mean ``|x|`` per channel ``(C,)``, fp32."""
        return (self.abs_sum / self.count if self.count > 0 else self.abs_sum).float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)

    def reduce(self, ranks: Ranks) -> None:
        """Sums and maxima over every rank's calls, and every rank's sampled rows in rank order (in place): the
        ranks hold contiguous shares of the batches, so the rows come in the one-process order."""
        if self.samples:
            self.samples = [ranks.gather_rows(self.sample())]
        count = torch.tensor([self.count], dtype=torch.float64, device=self.device)
        self.count = float(ranks.sum_(count))
        if self.abs_sum is not None:
            ranks.sum_(self.abs_sum)
            ranks.max_(self.abs_max)
        if self.hessian_sum is not None:
            ranks.sum_(self.hessian_sum)


class StatsCollector:
    """Collects :class:`InputStats` for Linears (``linear_input``) and fused experts (observer protocol).

    Expert ``e`` gets its own statistics (``NAME.gate_up_proj.E``, ``NAME.down_proj.E``) from
    every calibration token; tokens not routed to ``e`` count with weight ``unrouted_weight``
    (1 = all tokens equal; small values focus on the routed tokens while a starved expert
    still gets full-rank statistics).
    """

    def __init__(
        self, *, hessian: bool = False, sample_rows: int = 0, unrouted_weight: float = 1.0, keys: set[str] | None = None,
        grouped: dict[str, int] | None = None, channels: bool = True,
    ) -> None:
        self.hessian = hessian
        self.channels = channels  # keep the per-channel sum and max of |x| (False: only what ``hessian`` asks)
        self.sample_rows = sample_rows  # rows kept per forward call
        self.unrouted_weight = unrouted_weight
        self.keys = keys  # None: everything
        self.grouped = grouped or {}  # grouped linear (DeepSeek-V4 o_a_proj) -> groups: statistics per group
        self.stats: dict[str, InputStats] = {}

    def _add(self, key: str, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        if self.keys is not None and key not in self.keys:
            return
        self.stats.setdefault(key, InputStats()).add(
            x, hessian=self.hessian, sample_rows=self.sample_rows, weights=weights, channels=self.channels
        )

    def linear_input(self, name: str, x: torch.Tensor) -> None:
        """A Linear's input ``[..., in]``; a grouped one's ``[..., G, in_g]`` goes to ``NAME.group.g`` for each group."""
        groups = self.grouped.get(name)
        if groups is None:
            self._add(name, x)
            return
        for g in range(groups):
            self._add(f"{name}.group.{g}", x[..., g, :])

    def experts_input(self, name: str, x: torch.Tensor) -> None:
        self._add(f"{name}.gate_up_proj", x)

    def expert_tokens(self, name: str, expert: int, x: torch.Tensor, h: torch.Tensor, routed: torch.Tensor) -> None:
        """Expert ``expert``: input ``x`` (tokens, H), inner ``h`` (tokens, I), ``routed`` (tokens,) bool."""
        w = torch.where(routed, 1.0, self.unrouted_weight).to(torch.float32)
        self._add(f"{name}.gate_up_proj.{expert}", x, w)
        self._add(f"{name}.down_proj.{expert}", h, w)

    def __getitem__(self, key: str) -> InputStats:
        return self.stats[key]

    def reduce(self, ranks: Ranks = SINGLE) -> "StatsCollector":
        """Combine every rank's statistics (each rank saw its share of the calibration batches); every rank
        then holds the totals. Every rank observed the same inputs, so the keys agree."""
        if ranks.several:
            for key in sorted(self.stats):
                self.stats[key].reduce(ranks)
        return self
