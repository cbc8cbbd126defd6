"""Mixed-precision allocation: a path of per-module schemes from the smallest artifact to the most accurate.

From a :class:`~.sensitivity.SensitivityTable` (bytes and measured KL of every module under every candidate),
:func:`allocation_path` starts with every module at its smallest candidate and repeatedly makes the one
upgrade (a module moved to a larger candidate that lowers its KL) with the most KL removed per byte added,
until no upgrade lowers any module's KL (the greedy order of a knapsack relaxed to fractions). Each step is
one point of the path: bytes grow, the predicted KL (the sum of the modules' own KLs, an additive proxy)
falls. The search (:mod:`dsq.run.search`) then verifies points of the path end to end against the gates.
"""
from __future__ import annotations

from dataclasses import dataclass

from .sensitivity import ModuleSensitivity, SensitivityTable


@dataclass(frozen=True)
class Allocation:
    """A scheme label for every measured module, with the predicted bytes and KL."""

    labels: tuple[tuple[str, str], ...]  # (module name, candidate label), model order
    bytes: int
    kl: float

    def as_dict(self) -> dict[str, str]:
        return dict(self.labels)

    def counts(self) -> dict[str, int]:
        """Candidate label -> how many modules take it."""
        counts: dict[str, int] = {}
        for _, label in self.labels:
            counts[label] = counts.get(label, 0) + 1
        return counts


def _allocation(modules: list[ModuleSensitivity], chosen: dict[str, str]) -> Allocation:
    return Allocation(
        tuple((m.name, chosen[m.name]) for m in modules),
        sum(m.bytes[chosen[m.name]] for m in modules),
        sum(m.kl[chosen[m.name]] for m in modules),
    )


def uniform(table: SensitivityTable, label: str) -> Allocation:
    """Every module at candidate ``label``."""
    return _allocation(table.modules, {m.name: label for m in table.modules})


def _smallest(m: ModuleSensitivity) -> str:
    return min(m.bytes, key=lambda label: (m.bytes[label], m.kl[label]))


def _best_upgrade(modules: list[ModuleSensitivity], chosen: dict[str, str]) -> tuple[str, str] | None:
    """``(module, label)`` of the upgrade removing the most KL per added byte (a free one first), or None."""
    best, best_rate = None, 0.0
    for m in modules:
        current = chosen[m.name]
        for label in m.bytes:
            gain = m.kl[current] - m.kl[label]
            cost = m.bytes[label] - m.bytes[current]
            if gain <= 0:
                continue
            rate = float("inf") if cost <= 0 else gain / cost
            if rate > best_rate:
                best, best_rate = (m.name, label), rate
    return best


def allocation_path(table: SensitivityTable) -> list[Allocation]:
    """Allocations from every module at its smallest candidate to no upgrade left (see the module docstring)."""
    chosen = {m.name: _smallest(m) for m in table.modules}
    path = [_allocation(table.modules, chosen)]
    while (upgrade := _best_upgrade(table.modules, chosen)) is not None:
        name, label = upgrade
        chosen[name] = label
        path.append(_allocation(table.modules, chosen))
    return path
