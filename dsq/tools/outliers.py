"""Activation outlier channels: measure them, and give a model the ones large LLMs have.

Large trained LLMs feed their Linears a few input channels whose magnitude is 10-100x the
median (Dettmers et al., 2022, arXiv:2208.07339, sec. 4; Xiao et al., 2023, arXiv:2211.10438,
fig. 4), largely through the gain of the norm in front of them, and always the same hidden
dimensions. Weight quantization error on those channels is multiplied by their magnitude,
which is what activation-aware methods (AWQ, SmoothQuant) protect. A small model trained
briefly has none: :func:`input_outlier_ratios` measures it.

:func:`add_outlier_channels` multiplies chosen channels of every norm that feeds quantizable
Linears by a gain and divides those Linears' input columns by it (the inverse of an AWQ or
SmoothQuant fold, :func:`dsq.quantize.mappings.fold`). The full-precision function does not
change, but the weights and activations now have the outlier structure of a large model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dsq.quantize.mappings import fold, resolve
from dsq.quantize.sequential import decoder_layers
from dsq.quantize.stats import max_over_median


@dataclass(frozen=True)
class OutlierSpec:
    """Which channels become outliers and by how much.

    Attributes:
        fraction: share of a norm's channels made outliers (at least one).
        low: smallest gain, log-uniform up to ``high``.
        high: largest gain.
        seed: the channels and gains; every norm of the same width gets the same ones, as the
            outlier dimensions of a real model's residual stream are the same in every layer.
    """

    fraction: float = 0.02
    low: float = 20.0
    high: float = 100.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")
        if not 1 <= self.low <= self.high:
            raise ValueError(f"need 1 <= low <= high, got low={self.low}, high={self.high}")


def outlier_gains(width: int, spec: OutlierSpec) -> torch.Tensor:
    """Per-channel gains ``(width,)``: 1, except ``max(1, fraction * width)`` channels in ``[low, high]``."""
    g = torch.Generator().manual_seed(spec.seed * 100_003 + width)
    count = max(1, round(spec.fraction * width))
    channels = torch.randperm(width, generator=g)[:count]
    log_gain = torch.rand(count, generator=g, dtype=torch.float64) * (math.log(spec.high) - math.log(spec.low)) + math.log(spec.low)
    gains = torch.ones(width, dtype=torch.float32)
    gains[channels] = log_gain.exp().float()
    return gains


@torch.no_grad()
def add_outlier_channels(model: nn.Module, spec: OutlierSpec = OutlierSpec()) -> list[str]:
    """Give every norm that feeds balance layers outlier channels; the fp function is unchanged.

    Returns:
        The rescaled norms, by full name.
    """
    prefix, layers = decoder_layers(model)
    done = []
    for i, layer in enumerate(layers):
        for m in resolve(layer):
            smooth = layer.get_submodule(m.smooth)
            if m.per_expert or isinstance(smooth, nn.Linear):  # only norms: where real outliers come from
                continue
            fold(layer, m, 1.0 / outlier_gains(smooth.weight.shape[0], spec))  # norm gain x g, reader columns / g
            done.append(f"{prefix}.{i}.{m.smooth}")
    return done


@torch.no_grad()
def input_outlier_ratios(model: nn.Module, input_ids: torch.Tensor) -> dict[str, float]:
    """``max_j / median_j`` of the mean ``|x_j|`` over tokens at the input of every ``nn.Linear``.

    Args:
        model: a causal LM.
        input_ids: ``(batch, seq)`` token ids.

    Returns:
        Linear name -> ratio (about 1-5 without outliers, 10-100+ in large LLMs).
    """
    sums: dict[str, torch.Tensor] = {}

    def observe(name: str):
        def hook(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, C)
            sums[name] = sums.get(name, 0) + x.abs().sum(0)
        return hook

    handles = [m.register_forward_pre_hook(observe(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        model(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    return {n: max_over_median(s) for n, s in sums.items()}
