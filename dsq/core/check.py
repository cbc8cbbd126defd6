"""One named pass/fail check of a CI validation (integrity, reload, export ...)."""
from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class Check:
    """A pass/fail check that is not a metric gate (e.g. the manifest's sha256 of every file)."""

    name: str
    passed: bool
    message: str
