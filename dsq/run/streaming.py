"""Whether a run streams: the model's bytes in memory against the memory this machine has free."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dsq.core.checkpoint import CheckpointFiles
from dsq.core.fp4 import fp4_format
from dsq.core.fp8 import SCALE_SUFFIX

AUTO_STREAM_FRACTION = 0.5
"""A checkpoint is streamed automatically when its tensors exceed this share of available memory."""

def available_memory_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def checkpoint_values(files: CheckpointFiles) -> int:
    """Number of values in the checkpoint's tensors, from the headers ``files`` carries.

    Block scales (``*_scale_inv``, and DeepSeek-V4's ``*.scale`` beside a weight) are left out; a routed
    expert stored FP4 (two e2m1 values per int8 byte, :mod:`dsq.core.fp4`) counts two values per byte.
    """
    names = {name for header in files.headers for name in header.tensors}
    fp4 = fp4_format(files.config) is not None
    total = 0
    for header in files.headers:
        for name, tensor in header.tensors.items():
            if name.endswith(SCALE_SUFFIX) or (name.endswith(".scale") and f"{name[:-len('.scale')]}.weight" in names):
                continue
            packed = fp4 and tensor.dtype in ("I8", "U8") and ".experts." in name
            total += tensor.numel * (2 if packed else 1)
    return total


@dataclass(frozen=True)
class StreamingDecision:
    """Whether a run streams, and the sentence that says why (logged and put in the report)."""

    stream: bool
    reason: str


def decide_streaming(requested: bool | None, files: CheckpointFiles, dtype: torch.dtype) -> StreamingDecision:
    """``requested`` True/False wins; None streams when the model in ``dtype`` needs more than
    :data:`AUTO_STREAM_FRACTION` of the available memory."""
    if requested is not None:
        return StreamingDecision(requested, "streaming: true in the recipe" if requested else "streaming: false in the recipe")
    in_memory = checkpoint_values(files) * torch.empty((), dtype=dtype).element_size()
    available = available_memory_bytes()
    if available is None:
        return StreamingDecision(False, "available memory unknown; loading the model in memory")
    if in_memory > AUTO_STREAM_FRACTION * available:
        return StreamingDecision(
            True,
            f"the model needs ~{in_memory / 2**30:.1f} GiB in memory, more than {AUTO_STREAM_FRACTION:.0%} of the "
            f"{available / 2**30:.1f} GiB available: streaming one decoder layer at a time",
        )
    return StreamingDecision(False, f"the model (~{in_memory / 2**30:.2f} GiB) fits in memory")
