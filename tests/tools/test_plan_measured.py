"""``dsq plan`` against real runs: the host-memory estimates within a stated margin of the peak RSS of
pipeline runs (in memory and streamed, three model sizes), the artifact bytes exactly.

The runs are those of ``benchmarks/plan_vs_measured.py`` (each in a fresh process, two at a time):
the bundled model (18 MiB, float32 on disk) and synthetic DeepSeek-V3-shaped checkpoints of 50 MiB
and 150 MiB (BF16 on disk, loaded in float32), RTN int4 g128, int4 g32 asymmetric and int8
per-channel.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "plan_vs_measured.py"

TOLERANCE = 0.20
"""Largest relative error of a peak-memory estimate against the run's measured peak RSS. The runs on an
AMD EPYC (AVX512) with torch 2.13 and transformers 5.25 are within 6 % (RESULTS.md, "Plans against
measurement"); the rest is left for machines whose runtime (libraries, allocator, CPU kernels)
takes some tens of MiB more or less. A 4x error in any part that matters at these sizes (the
runtime, the model, the loader's pages and staging copies, the quantized copy) is far outside it."""


def _benchmark():
    spec = importlib.util.spec_from_file_location("plan_vs_measured", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


BENCHMARK = _benchmark()


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Every run of the benchmark, planned and measured."""
    return BENCHMARK.measure(tmp_path_factory.mktemp("plan_vs_measured"), jobs=2)


def _name(index: int) -> str:
    model, streaming, scheme = BENCHMARK.RUNS[index]
    return f"{model}-{'streamed' if streaming else 'in-memory'}-{BENCHMARK.SCHEMES[scheme].replace(' ', '-')}"


RUN_INDICES = range(len(BENCHMARK.RUNS))


@pytest.mark.slow
@pytest.mark.parametrize("index", RUN_INDICES, ids=_name)
def test_peak_memory_estimate_is_within_the_margin_of_the_measured_peak(rows, index):
    row = rows[index]
    assert abs(row.error) <= TOLERANCE, (
        f"{row.model} {'streamed' if row.streaming else 'in memory'}: planned {row.planned_peak >> 20} MiB, "
        f"measured {row.quantization_peak >> 20} MiB ({row.error:+.1%})"
    )


@pytest.mark.slow
@pytest.mark.parametrize("index", RUN_INDICES, ids=_name)
def test_artifact_bytes_are_the_written_tensor_bytes(rows, index):
    row = rows[index]
    assert row.written_artifact > 0 and row.planned_artifact == row.written_artifact


@pytest.mark.slow
def test_the_runs_cover_two_synthetic_sizes_both_paths_and_every_scheme(rows):
    synthetic = [r for r in rows if r.model.startswith("synthetic")]
    sizes = {r.checkpoint_bytes for r in synthetic}
    assert len(sizes) == 2 and max(sizes) >= 2.5 * min(sizes)
    assert {(r.model, r.streaming) for r in rows} == {(m, s) for m in ("bundled", *BENCHMARK.SYNTHETIC) for s in (False, True)}
    assert {r.scheme for r in synthetic} == {"int4 g128", "int4 g32 asym", "int8 per-channel"}
