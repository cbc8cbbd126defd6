"""Training checkpoints: ``step-N`` directories of safetensors, written atomically, read back exactly.

A checkpoint holds the trainable tensors (full tensors, whether the run is sharded or not), the
optimizer state, every process's RNG state and ``trainer_state.json`` (step, world size, the settings
a resumed run must share, the data digest, the loss history). Nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dsq.core.errors import CheckpointError

from .fsdp import full_tensor, is_dtensor, is_sharded, local_shard, reshard
from .train_config import TrainConfig

if TYPE_CHECKING:
    from .data import TrainingData

CHECKPOINT_VERSION = 1


def trainable_state(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Full trainable tensors by name (on CPU). On a sharded model every rank must call it (one
    gather per tensor); ``keep=False`` joins the gathers and keeps nothing."""
    reshard(model)
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            full = full_tensor(p.detach())
            if keep:
                out[n] = full.cpu().contiguous()
    return out


def weights_digest(model: nn.Module) -> str:
    """sha256 over the trainable tensors' names and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(trainable_state(model).items()):
        h.update(name.encode())
        h.update(t.float().cpu().numpy().tobytes())
    return h.hexdigest()


def _optimizer_tensors(optimizer: torch.optim.Optimizer, keep: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state as flat full tensors (``state.{param}.{key}``) plus JSON-able groups
    (sharded state: gathered, every rank must call it; ``keep=False`` keeps nothing)."""
    sd = optimizer.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            full = full_tensor(value) if isinstance(value, torch.Tensor) else torch.tensor(value)
            if keep:
                tensors[f"state.{pid}.{key}"] = full.cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        param = params[int(pid)] if int(pid) < len(params) else None
        if param is not None and is_dtensor(param) and value.shape == param.shape:
            value = local_shard(value, param)  # full tensor -> this rank's shard
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def checkpoint_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints under ``root`` (``step-NNNNNNN`` dirs), ascending."""
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-") and (d / "trainer_state.json").is_file():
            steps.append(int(d.name.removeprefix("step-")))
    return sorted(steps)


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def data_digest(data: TrainingData) -> str:
    """sha256 of the training and validation blocks: a resumed run must train on the same data."""
    h = hashlib.sha256()
    for blocks in (data.train, data.validation):
        for t in (blocks.input_ids, blocks.labels, blocks.attention_mask):
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer, accelerator, config: TrainConfig, history: dict,
                    data_sha256: str = "") -> Path:
    """Write ``root/step-N`` atomically: trainable tensors, optimizer, per-rank RNG, state JSON."""
    final = _step_dir(root, step)
    tmp = root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_file({"cpu": torch.get_rng_state()}, str(tmp / f"rng-rank{accelerator.process_index}.safetensors"))
    sharded = is_sharded(model)
    if sharded or accelerator.is_main_process:  # sharded tensors: every rank joins the gathers, the main one keeps
        tensors = trainable_state(accelerator.unwrap_model(model), keep=accelerator.is_main_process)
        opt_tensors, opt_meta = _optimizer_tensors(optimizer, keep=accelerator.is_main_process)
    if accelerator.is_main_process:
        save_file(tensors, str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        state = {"version": CHECKPOINT_VERSION, "step": step, "world_size": accelerator.num_processes,
                 "config": config.fingerprint(), "data_sha256": data_sha256, "optimizer": opt_meta, "history": history}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_steps(root)[: -config.keep_checkpoints]:
            shutil.rmtree(_step_dir(root, old), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer, accelerator, config: TrainConfig, data_sha256: str = "") -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its state JSON."""
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("data_sha256") != data_sha256:
        raise CheckpointError(f"{path}: the checkpoint was trained on other data (token blocks differ); "
                              "resume needs the same data (or a new checkpoint directory)")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}")
    if state["world_size"] != accelerator.num_processes:
        raise CheckpointError(f"{path}: written by {state['world_size']} processes, resumed with {accelerator.num_processes}")
    mine = config.fingerprint()
    for key, value in state["config"].items():
        if mine.get(key) != value:
            raise CheckpointError(f"{path}: training setting '{key}' was {value!r}, the recipe now says {mine.get(key)!r}; "
                                  "resume needs the same settings (or a new checkpoint directory)")
    tensors = load_file(str(path / "trainable.safetensors"))
    reshard(model)
    params = dict(accelerator.unwrap_model(model).named_parameters())
    for name, value in tensors.items():
        p = params.get(name)
        if p is None or not p.requires_grad or p.shape != value.shape:
            raise CheckpointError(f"{path / 'trainable.safetensors'}: tensor {name} {tuple(value.shape)} does not match the model")
        with torch.no_grad():
            p.copy_(local_shard(value, p) if is_dtensor(p) else value)
    missing = sorted({n for n, p in params.items() if p.requires_grad} - set(tensors))
    if missing:
        raise CheckpointError(f"{path / 'trainable.safetensors'}: no tensor for trainable parameter {missing[0]}")
    _load_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    torch.set_rng_state(load_file(str(path / f"rng-rank{accelerator.process_index}.safetensors"))["cpu"])
    return state
