"""``dsq plan`` against real runs: the host-memory estimates within a stated margin of the peak RSS of
pipeline runs (in memory and streamed, three model sizes), the artifact bytes exactly.

The runs are those of ``benchmarks/plan_vs_measured.py`` (each in a fresh process, two at a time):
the bundled model (18 MiB, float32 on disk) and synthetic DeepSeek-V3-shaped checkpoints of 50 MiB
and 150 MiB (BF16 on disk, loaded in float32), RTN int4 g128, int4 g32 asymmetric and int8
per-channel. Learned rounding (``autoround``) is checked on the bundled model: a pipeline run's peak
against the plan, the growth of training its blocks against the plan's training state (glibc's mmap
threshold fixed, as in ``test_plan_rounding.py``), and its matmul FLOPs, counted, against the plan's.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MiB = 1 << 20

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


# ----------------------------------------------------------------------------- learned rounding (autoround)

AUTOROUND = ("quantize.method=autoround", "quantize.autoround.mse_init=false")
"""Learned rounding without the initial range search: that search is a Python loop over every group, most of a
short run's time on this model, and holds no more than one weight's rounding temporaries."""

AUTOROUND_RUN = (*AUTOROUND, "quantize.autoround.steps=2", "quantize.calibration.samples=8")
"""The pipeline run: one batch of 8 x 256 tokens, two steps per block."""

AUTOROUND_BLOCKS = {  # what the training holds at its peak -> recipe overrides (one step per block)
    "rounding state (16 tokens a step)": (*AUTOROUND, "quantize.autoround.steps=1", "quantize.autoround.min_expert_tokens=1",
                                          "quantize.calibration.samples=8", "quantize.calibration.seq_len=16",
                                          "quantize.calibration.batch_size=1"),
    "rounding state and activations (1024 tokens a step)": (*AUTOROUND, "quantize.autoround.steps=1",
                                                            "quantize.calibration.samples=4", "quantize.calibration.batch_size=4"),
}

BLOCK_TOLERANCE = 0.20
"""The plan's quantized copy, temporaries, hidden states, training state and workspace against the measured growth
of the whole quantization (mmap threshold fixed). Measured here: the plan 11 % below with 16 tokens a step (the
largest block's rounding state dominates) and 8 % below with 1024 (its activations too)."""

FLOPS_TOLERANCE = 0.10
"""The plan's layer forwards and training FLOPs against the matmul FLOPs counted in the run. Measured: the plan 2 %
below (SDPA's backward recomputes the scores); a step counted as two forwards instead of three is 16 % below."""

_GROWTH_PARTS = ("quantized copy being built", "quantization temporaries (largest tensor)", "calibration activations",
                 "method statistics of the largest layer or lm_head", "forward workspace")

_MEASURE_AUTOROUND = r'''
import ctypes, gc, json, sys
from contextlib import nullcontext
import torch
from dsq.eval.memory import PeakRSS

def growth(work):
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with PeakRSS() as rss:
        work()
    assert rss.reset_supported, "the kernel did not reset the RSS high-water mark"
    return rss.peak_bytes - rss.start_bytes

def flop_counter():
    """Matmul FLOPs (torch.utils.flop_counter), with formulas for the CPU kernels it has none for."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
    aten = torch.ops.aten
    def grouped_mm(a, b, *args, out_shape, **kwargs):  # [S, K] x [E, K, N] -> [S, N]; [K, S] x [S, N] -> [E, K, N]
        return 2 * out_shape[-2] * out_shape[-1] * a[-1]
    def sdpa(q, k, v, *args, out_shape, **kwargs):
        return sdpa_flop_count(q, k, v)
    def sdpa_backward(grad_out, q, k, v, *args, out_shape, **kwargs):
        return sdpa_backward_flop_count(grad_out, q, k, v)
    return FlopCounterMode(display=False, custom_mapping={
        aten._grouped_mm: grouped_mm, aten._scaled_dot_product_flash_attention_for_cpu: sdpa,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward})

def quantize(path, overrides, counter=None):
    """Growth of quantizing ``path`` (float32) as the recipe of ``overrides`` says, on random tokens."""
    from dsq.core.loading import load_checkpoint
    from dsq.quantize import quantize_
    from dsq.run.recipe import load_recipe
    section = load_recipe(None, overrides).quantize
    data = section.calibration
    model = load_checkpoint(path, dtype=torch.float32).model
    ids = torch.randint(3, model.config.vocab_size, (data.samples, data.seq_len), generator=torch.Generator().manual_seed(0))
    config = section.config(torch.float32)
    with counter if counter is not None else nullcontext():
        return growth(lambda: quantize_(model, config, calibration=ids, progress=False))

path, runs = sys.argv[1], json.loads(sys.argv[2])
quantize(path, [*runs[0], "quantize.calibration.samples=1", "quantize.calibration.seq_len=8"])  # first use, once
counter = flop_counter()
grown = [quantize(path, overrides) for overrides in runs[:-1]] + [quantize(path, runs[-1], counter)]
print(json.dumps({"growth": grown, "flops": counter.get_total_flops()}))
'''


def _child(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _last_json(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=1200)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def autoround(tmp_path_factory) -> dict:
    """The pipeline run (default allocator) and the block measurements (mmap threshold fixed), side by side."""
    from dsq.core.checkpoint import bundled_model_path

    out = tmp_path_factory.mktemp("autoround") / "out"
    pipeline = _child([sys.executable, str(_SCRIPT), "--child", f"output={out}", "streaming=false", *BENCHMARK.EVAL,
                       *AUTOROUND_RUN])
    runs = json.dumps([list(overrides) for overrides in AUTOROUND_BLOCKS.values()])
    blocks = _child([sys.executable, "-c", _MEASURE_AUTOROUND, str(bundled_model_path()), runs],
                    env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)})
    return {"pipeline": _last_json(pipeline), **_last_json(blocks)}


def _plan(overrides: tuple[str, ...]):
    from dsq.core.checkpoint import bundled_model_path
    from dsq.run.recipe import load_recipe
    from dsq.tools.plan import plan_checkpoint

    return plan_checkpoint(bundled_model_path(), load_recipe(None, list(overrides)))


@pytest.mark.slow
def test_autoround_peak_memory_estimate_is_within_the_margin_of_the_measured_peak(autoround):
    planned, measured = _plan(AUTOROUND_RUN).in_memory.total, autoround["pipeline"]["quantization_peak"]
    assert abs(planned - measured) <= TOLERANCE * measured, f"planned {planned >> 20} MiB, measured {measured >> 20} MiB"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(AUTOROUND_BLOCKS)), ids=list(AUTOROUND_BLOCKS))
def test_autoround_block_training_grows_as_planned(autoround, index):
    overrides = list(AUTOROUND_BLOCKS.values())[index]
    parts = dict(_plan(overrides).in_memory.parts)
    planned, grown = sum(parts[p] for p in _GROWTH_PARTS), autoround["growth"][index]
    assert abs(planned - grown) <= BLOCK_TOLERANCE * grown, f"planned {planned / MiB:.1f} MiB, measured {grown / MiB:.1f} MiB"


@pytest.mark.slow
def test_autoround_matmul_flops_are_planned(autoround):
    flops = dict(_plan(list(AUTOROUND_BLOCKS.values())[-1]).time.flops)
    planned = flops["layer forwards"] + flops["training steps (forward and backward of one batch)"]
    measured = autoround["flops"]
    assert abs(planned - measured) <= FLOPS_TOLERANCE * measured, f"planned {planned:.3g}, counted {measured:.3g}"
