"""The training loop: schedule, data order, checkpoints, resume after a kill, two processes."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dsq.core.errors import CheckpointError
from dsq.finetune.trainer import (
    Constant, Cosine, TrainConfig, TrainingError, checkpoint_steps, micro_batches, step_indices, train, weights_digest,
)
from dsq.tools.testing import make_tiny_checkpoint

SCRIPT = Path(__file__).with_name("train_script.py")
sys.path.insert(0, str(SCRIPT.parent))
from train_script import _Data, blocks  # noqa: E402


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory) -> Path:
    return make_tiny_checkpoint("deepseek_v3", tmp_path_factory.mktemp("v3"))


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_lr_schedule_warmup_then_cosine_to_min_ratio():
    c = TrainConfig(max_steps=110, lr=1e-3, warmup_steps=10, schedule=Cosine(min_ratio=0.1))
    assert c.lr_at(0) == pytest.approx(1e-4)
    assert c.lr_at(9) == pytest.approx(1e-3)
    assert c.lr_at(10) == pytest.approx(1e-3)
    assert c.lr_at(60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert c.lr_at(110) == pytest.approx(1e-4)
    flat = TrainConfig(max_steps=50, lr=2e-4, warmup_steps=0, schedule=Constant())
    assert {flat.lr_at(s) for s in range(50)} == {2e-4}


def test_step_indices_are_a_function_of_the_step_and_cover_each_epoch():
    a = [step_indices(10, s, 4, seed=3) for s in range(5)]  # 20 indices = two epochs of 10
    b = [step_indices(10, s, 4, seed=3) for s in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    flat = torch.cat(a).tolist()
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a new permutation each epoch
    assert not torch.equal(step_indices(10, 0, 4, seed=4), a[0])


def test_micro_batches_partition_the_step_across_ranks():
    idx = torch.arange(12)
    parts = [micro_batches(idx, r, world=2, accum=3, batch=2) for r in range(2)]
    seen = sorted(torch.cat([m for p in parts for m in p]).tolist())
    assert seen == list(range(12))
    assert all(len(p) == 3 and all(len(m) == 2 for m in p) for p in parts)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")


def test_training_lowers_validation_loss_and_checkpoints_atomically(tiny_v3, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_v3)
    pattern = torch.arange(3, 35).repeat(1, 4)[:, :64]  # a learnable sequence
    data = _Data(*(type(blocks(1, 1, 0))(input_ids=pattern.repeat(n, 1), labels=pattern.repeat(n, 1),
                                         attention_mask=torch.ones(n, 64, dtype=torch.long)) for n in (16, 4)))
    config = TrainConfig(max_steps=12, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=4, save_every=4)
    result = train(model, data, config, checkpoint_dir=tmp_path / "ck", progress=False)
    losses = [v for _, v in result.validation]
    assert losses[-1] < losses[0] - 1.0
    assert result.tokens_seen == 12 * 4 * 64 and result.world_size == 1
    assert checkpoint_steps(tmp_path / "ck") == [8, 12]  # keep_checkpoints=2, older ones removed
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "ck").iterdir())
    assert {p.name for p in (tmp_path / "ck" / "step-0000012").iterdir()} == {
        "trainable.safetensors", "optimizer.safetensors", "trainer_state.json", "rng-rank0.safetensors"}


def test_resume_refuses_a_checkpoint_made_with_other_settings(tiny_v3, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_v3)
    data = _Data(blocks(16, 32, 0), blocks(4, 32, 1))
    train(model, data, TrainConfig(max_steps=2, batch_size=2, lr=1e-3, save_every=2), checkpoint_dir=tmp_path, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_v3)
    with pytest.raises(CheckpointError, match="'lr'"):
        train(model, data, TrainConfig(max_steps=2, batch_size=2, lr=2e-3, save_every=2), checkpoint_dir=tmp_path, progress=False)


def test_non_finite_loss_fails_naming_the_step(tiny_v3):
    model = AutoModelForCausalLM.from_pretrained(tiny_v3)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="step 1"):
        train(model, _Data(blocks(8, 16, 0), blocks(2, 16, 1)), TrainConfig(max_steps=2, batch_size=2), progress=False)


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=300, **kw)


def test_a_killed_run_resumes_and_ends_at_the_same_weights(tiny_v3, tmp_path):
    steps = "40"
    ref = tmp_path / "ref.json"
    done = _run([sys.executable, str(SCRIPT), str(tiny_v3), str(tmp_path / "ck-ref"), str(ref), "--steps", steps])
    assert done.returncode == 0, done.stderr[-2000:]

    ck, out = tmp_path / "ck", tmp_path / "out.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tiny_v3), str(ck), str(out), "--steps", steps],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not [s for s in checkpoint_steps(ck) if s >= 6] and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not out.exists()
    killed_at = checkpoint_steps(ck)[-1]
    assert 6 <= killed_at < int(steps)

    resumed = _run([sys.executable, str(SCRIPT), str(tiny_v3), str(ck), str(out), "--steps", steps])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = json.loads(ref.read_text()), json.loads(out.read_text())
    assert b["resumed_from_step"] == killed_at
    assert b["rank_weight_digests"] == a["rank_weight_digests"]
    assert b["validation"][-1] == a["validation"][-1]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_processes_end_with_identical_weights(tiny_v3, tmp_path):
    out = tmp_path / "out.json"
    done = _run(["torchrun", "--nproc_per_node", "2", "--master_port", "29533", str(SCRIPT), str(tiny_v3),
                 str(tmp_path / "ck"), str(out), "--steps", "8"])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    digests = result["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert {p.name for p in (tmp_path / "ck" / "step-0000008").iterdir()} >= {"rng-rank0.safetensors", "rng-rank1.safetensors"}
    single = _run([sys.executable, str(SCRIPT), str(tiny_v3), str(tmp_path / "ck1"), str(tmp_path / "one.json"), "--steps", "8"])
    assert single.returncode == 0, single.stderr[-2000:]
    assert json.loads((tmp_path / "one.json").read_text())["rank_weight_digests"][0] != digests[0]  # twice the data per step
    assert math.isfinite(result["final_validation_loss"])


def test_weights_digest_sees_a_changed_weight(tiny_v3):
    model = AutoModelForCausalLM.from_pretrained(tiny_v3)
    before = weights_digest(model)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3
    assert weights_digest(model) != before


def test_resume_refuses_a_checkpoint_trained_on_other_data(tiny_v3, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_v3)
    config = TrainConfig(max_steps=2, batch_size=2, lr=1e-3, save_every=2)
    train(model, _Data(blocks(16, 32, 0), blocks(4, 32, 1)), config, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="other data"):
        train(model, _Data(blocks(16, 32, 5), blocks(4, 32, 1)), config, checkpoint_dir=tmp_path, progress=False)


def test_bf16_autocast_trains_with_fp32_weights(tiny_v3):
    model = AutoModelForCausalLM.from_pretrained(tiny_v3)
    result = train(model, _Data(blocks(8, 32, 0), blocks(2, 32, 1)),
                   TrainConfig(max_steps=2, batch_size=2, lr=1e-3, mixed_precision="bf16"), progress=False)
    assert math.isfinite(result.final_validation_loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast only: master weights stay fp32
