"""Size and memory measurements."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dsq.core.errors import CheckpointError
from dsq.eval.memory import PeakRSS, dir_bytes, files_bytes, machine_info, weight_bytes_in_memory


class PackedLinear(nn.Module):
    """A quantized-style layer: packed int8 weights and a float scale in buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("qweight", torch.zeros(64, 32, dtype=torch.int8))
        self.register_buffer("packed", torch.zeros(16, dtype=torch.int32))
        self.register_buffer("scale", torch.ones(64, dtype=torch.float16))


def test_weight_bytes_counts_integer_buffers() -> None:
    model = nn.Sequential(PackedLinear(), nn.Linear(4, 2))
    expected = 64 * 32 * 1 + 16 * 4 + 64 * 2 + (4 * 2 + 2) * 4
    assert weight_bytes_in_memory(model) == expected


def test_weight_bytes_counts_tied_tensors_once() -> None:
    embed = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    assert weight_bytes_in_memory(nn.ModuleList([embed, head])) == 10 * 4 * 4


def test_disk_sizes(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.safetensors").write_bytes(b"x" * 50)
    (tmp_path / "config.json").write_bytes(b"x" * 7)
    assert dir_bytes(tmp_path) == 150
    assert dir_bytes(tmp_path, suffixes=(".json",)) == 7
    assert files_bytes(tmp_path) == 157
    with pytest.raises(CheckpointError, match="missing"):
        files_bytes(tmp_path / "missing")


def test_peak_rss_sees_a_large_allocation() -> None:
    size = 256 * 1024 * 1024
    with PeakRSS() as peak:
        block = torch.ones(size // 4, dtype=torch.float32)  # touches every page
        del block
    assert peak.start_bytes > 0
    if peak.reset_supported:
        assert peak.peak_bytes - peak.start_bytes >= 0.8 * size
    else:
        assert peak.peak_bytes >= 0.8 * size


def test_machine_info_names_the_stack() -> None:
    info = machine_info()
    assert info["torch"] == torch.__version__
    assert isinstance(info["logical_cores"], int) and info["cpu"]
