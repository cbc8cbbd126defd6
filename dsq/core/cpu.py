"""This machine's CPU feature flags, which decide the kernels ONNX Runtime, bitsandbytes and torch take."""
from __future__ import annotations

from pathlib import Path


def cpu_flags() -> set[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is no such file)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text(errors="replace").splitlines() if cpuinfo.is_file() else []
    for line in lines:
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()
