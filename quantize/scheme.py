"""Quantization schemes: what a quantized weight looks like, independent of how it is computed.

A scheme is a small frozen value. Granularity is a type (``PerChannel()``, ``PerGroup(128)``),
not a string, and every scheme validates itself on construction with an error that lists
what is allowed.

Example:
    >>> WeightScheme(bits=4, granularity=PerGroup(128), symmetric=True)
    WeightScheme(bits=4, granularity=PerGroup(size=128), symmetric=True)
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class PerChannel:
    """One scale (and zero point) per output channel: a row of the weight."""

    def num_groups(self, in_features: int) -> int:
        return 1

    def group_width(self, in_features: int) -> int:
        return in_features

    def describe(self) -> str:
        return "per-channel"


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``size`` consecutive input columns of each output channel.

    When ``size`` does not divide the input width the last group of each row is ragged
    (narrower); it is quantized like the others with its own scale.
    """

    size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 2:
            raise ValueError(f"group size must be an integer >= 2, got {self.size!r}")

    def num_groups(self, in_features: int) -> int:
        return math.ceil(in_features / self.size)

    def group_width(self, in_features: int) -> int:
        return min(self.size, in_features)

    def describe(self) -> str:
        return f"group {self.size}"


Granularity = PerChannel | PerGroup


@dataclass(frozen=True)
class WeightScheme:
    """Integer weight quantization.

    Args:
        bits: 4 or 8. 4-bit values are packed two per byte.
        granularity: ``PerChannel()`` or ``PerGroup(size)``.
        symmetric: symmetric (scale only, zero point 0) or asymmetric (scale and zero point).
    """

    bits: int = 8
    granularity: Granularity = PerChannel()
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if not isinstance(self.granularity, (PerChannel, PerGroup)):
            raise ValueError(
                f"granularity must be PerChannel() or PerGroup(size), got {self.granularity!r}"
            )

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def describe(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return f"int{self.bits} {self.granularity.describe()} {kind}"


KEEP = "keep"  # the label of "not quantized": kept in the model dtype

_LABEL = re.compile(r"int(?P<bits>4|8)-(?:(?P<ch>ch)|g(?P<group>[0-9]+))(?P<asym>-asym)?")


def scheme_label(scheme: WeightScheme) -> str:
    """``int4-g128``, ``int8-ch``, ``int4-g32-asym``: a scheme as recipes name it (:func:`parse_scheme_label`)."""
    granularity = "ch" if isinstance(scheme.granularity, PerChannel) else f"g{scheme.granularity.size}"
    return f"int{scheme.bits}-{granularity}" + ("" if scheme.symmetric else "-asym")


def parse_scheme_label(text: str) -> WeightScheme:
    """The scheme named ``int<4|8>-<ch|g<size>>[-asym]`` (e.g. ``int4-g128``, ``int8-ch``).

    Raises:
        ValueError: ``text`` is not such a name.
    """
    match = _LABEL.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a scheme: write int4-g128, int4-g32, int8-ch, int4-g128-asym, ...")
    granularity = PerChannel() if match["ch"] else PerGroup(int(match["group"]))
    return WeightScheme(int(match["bits"]), granularity, symmetric=match["asym"] is None)


def parse_scheme_or_keep(text: str) -> WeightScheme | None:
    """:func:`parse_scheme_label`, or None for ``keep`` (the module stays in the model dtype)."""
    return None if text == KEEP else parse_scheme_label(text)


def scheme_or_keep_label(scheme: WeightScheme | None) -> str:
    """:func:`scheme_label`, or ``keep`` for None."""
    return KEEP if scheme is None else scheme_label(scheme)
