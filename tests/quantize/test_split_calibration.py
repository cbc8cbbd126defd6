"""Calibration shared by two processes (``torchrun --nproc_per_node 2 -m dsq run``, gloo on CPU) writes the
artifact one process writes, tensor for tensor; methods that cannot share calibration are refused."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsq.tools.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
FAST = [
    "quantize.calibration.samples=16", "quantize.calibration.seq_len=64", "quantize.calibration.batch_size=4",
    "eval.perplexity=null", "eval.multiple_choice=null", "eval.fidelity.max_tokens=512", "eval.gates={}",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # the same threads per process in both runs

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")


def _run(processes: int, recipe: str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = ["-m", "dsq", "run", str(ROOT / "recipes" / recipe), f"output={out}", *FAST, *overrides, "-q"]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = ["torchrun", "--nproc_per_node", str(processes), "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)


def _tensors(root: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _same_artifact(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and ta
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    ca, cb = (json.loads((p / "config.json").read_text())["quantization_config"] for p in (a, b))
    assert ca == cb


def _exited_2_cleanly(stderr: str) -> None:
    """A rank's dsq exited 2 with its message (the launcher then stops the other one, which may not get to say it);
    the only traceback is the launcher's own (ChildFailedError)."""
    assert "exitcode  : 2" in stderr, stderr[-2000:]
    assert not re.search(r'File "[^"]*/(dsq|quantize|export|finetune|eval)/[^"]*\.py"', stderr), stderr[-3000:]


def _calibration(root: Path) -> dict:
    report = json.loads((root / "report.json").read_text())
    return report["candidates"][0]["extra"]["quantization"]["calibration"]


@pytest.mark.parametrize("recipe, overrides", [
    ("gptq_int4_g128.yaml", ["quantize.gptq.expert_chunk=3"]),  # MoE experts, dense and shared MLPs, MLA
    ("gptq_int4_g128.yaml", ["streaming=true"]),
    ("w8a8_smoothquant.yaml", []),
    ("awq_int4_g128.yaml", ["quantize.awq.search_tokens=256", "quantize.awq.clip=true"]),
    ("awq_int4_g128.yaml", ["quantize.awq.search_tokens=256", "streaming=true"]),
], ids=["gptq", "gptq-streaming", "w8a8-smoothquant", "awq-clip", "awq-streaming"])
def test_two_processes_write_the_one_process_artifact(tmp_path, recipe, overrides):
    one, two = tmp_path / "one", tmp_path / "two"
    done = _run(1, recipe, one, *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _run(2, recipe, two, *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [l for l in done.stdout.splitlines() if l.startswith("artifact:")] == [f"artifact: {two}"]  # only the main process reports
    _same_artifact(one, two)
    c1, c2 = _calibration(one), _calibration(two)
    assert c1["expert_routed_tokens"] == c2["expert_routed_tokens"]  # counted on both ranks, summed
    assert sum(sum(v) for v in c2["expert_routed_tokens"].values()) > 0
    assert c1["tokens"] == c2["tokens"] == 16 * 64


@pytest.mark.parametrize("recipe, overrides, message", [
    # a method that cannot share its calibration
    ("autoround_int4_g32.yaml", (), "quantize.method 'autoround' cannot split its calibration; methods that can: gptq, awq, w8a8"),
    # more processes than batches (16 samples: one batch)
    ("gptq_int4_g128.yaml", ("quantize.calibration.batch_size=16",),
     "calibration has 1 batch(es) of quantize.calibration.batch_size sequences; 2 processes need at least one each"),
])
def test_a_run_two_processes_cannot_share_is_refused(tmp_path, recipe, overrides, message):
    out = tmp_path / "out"
    done = _run(2, recipe, out, *overrides)
    assert done.returncode != 0
    assert message in done.stderr
    _exited_2_cleanly(done.stderr)
    assert not out.exists()


def test_awq_needs_its_replayed_batches_on_the_first_process(tmp_path):
    out = tmp_path / "awq"
    # 16 samples of 64 tokens in batches of 4: 4 batches, 2 per process; 4096 search tokens replay all 4
    done = _run(2, "awq_int4_g128.yaml", out, "quantize.awq.search_tokens=4096")
    assert done.returncode != 0
    assert "awq replays the first 4 calibration batches (awq.search_tokens 4096); with 2 processes the first one holds 2" in done.stderr
    _exited_2_cleanly(done.stderr)
    assert not out.exists()
