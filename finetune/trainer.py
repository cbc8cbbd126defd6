"""One training loop for QAT and LoRA, on accelerate: one process on CPU, or several (DDP).

What it does per optimizer step: ``grad_accum`` micro-batches of ``batch_size`` blocks on every
process (gradients synchronised on the last one only), loss = cross-entropy on scored tokens,
optionally mixed with distillation from a teacher (KL(teacher || student), Hinton et al., 2015);
global gradient-norm clipping; AdamW; learning rate from warmup + schedule computed from the step
alone. Validation every ``eval_every`` steps, a checkpoint every ``save_every`` steps.

Determinism and resume: the blocks of step ``s`` are a function of ``(seed, s)`` only (a seeded
permutation per epoch, split across processes and micro-batches), the learning rate too, and a
checkpoint holds the trainable tensors, the optimizer state and every process's RNG state, all in
safetensors (nothing is unpickled). A killed run restarted with ``resume`` continues from its last
complete checkpoint and ends at the same weights as an uninterrupted run. Checkpoints are written
to a temporary directory and renamed, so a kill never leaves a half-written one.

Several processes: launch with ``torchrun --nproc_per_node N`` (or ``accelerate launch --multi_gpu
--num_processes N``); on CPU the ranks use gloo. At the end every rank hashes its trainable
weights and the run fails if any two differ.

Sharded (``fsdp=True``, several processes): instead of DDP, torch's FSDP2 ``fully_shard`` is
applied to every decoder layer and then to the root, on a device mesh of the accelerator's device
type (CPU with gloo, CUDA with NCCL); each rank holds 1/N of every parameter, its gradient and its
AdamW state, and one layer's parameters are gathered at a time for forward and backward. The
optimizer is built over the sharded parameters. Gradients are reduce-scattered after every
micro-batch (sharded accumulation: full-size gradients are never kept), clipping sees the global
norm of the sharded gradients, checkpoints hold full tensors in the same layout as unsharded runs,
and after training the model is made plain again (full tensors, no FSDP hooks) on the device it
came on.

Example:
    >>> result = train(model, data, TrainConfig(max_steps=100, lr=1e-4), checkpoint_dir=Path("runs/x.ckpt"))
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from dsq.core.errors import CheckpointError, TrainingError

from .fsdp import (
    device_of, full_tensor, gather_objects, is_dtensor, is_sharded, local_shard, reshard, shard_model, unshard_model,
)

if TYPE_CHECKING:
    from .data import TokenBlocks, TrainingData

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class Cosine:
    """Cosine decay from the peak to ``min_ratio`` x peak at ``max_steps``."""

    min_ratio: float = 0.1

    def factor(self, progress: float) -> float:
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Linear:
    """Linear decay from the peak to ``min_ratio`` x peak at ``max_steps``."""

    min_ratio: float = 0.0

    def factor(self, progress: float) -> float:
        return 1 - (1 - self.min_ratio) * progress


@dataclass(frozen=True)
class Constant:
    """The peak learning rate after warmup."""

    def factor(self, progress: float) -> float:
        return 1.0


Schedule = Cosine | Linear | Constant


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (one optimizer step = ``batch_size x grad_accum x processes`` blocks).

    Args:
        max_steps: optimizer steps.
        batch_size: blocks per micro-batch per process.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate.
        warmup_steps: linear warmup from ``lr / warmup_steps``.
        schedule: decay after warmup.
        weight_decay: AdamW decay on matrices (parameters with 2+ dimensions).
        max_grad_norm: global gradient-norm clip (None: off).
        mixed_precision: ``"no"`` or ``"bf16"`` (autocast; weights and optimizer stay fp32).
        distill_weight: share of the loss from distillation against the teacher (0: plain CE).
        eval_every: validation interval in steps (0: only at the end).
        save_every: checkpoint interval in steps (0: none).
        keep_checkpoints: how many recent checkpoints to keep.
        seed: data order and initial RNG state.
        eval_batch_size: blocks per validation forward.
        fsdp: shard parameters, gradients and optimizer state across the processes (FSDP2)
            instead of replicating them (DDP); no effect with one process.
    """

    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 10
    schedule: Schedule = Cosine()
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    distill_weight: float = 0.0
    eval_every: int = 50
    save_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    eval_batch_size: int = 16
    fsdp: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_batch_size", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        return self.lr * self.schedule.factor(min(1.0, (step - self.warmup_steps) / span))

    def fingerprint(self) -> dict:
        """The fields a resumed run must share with its checkpoint (all but the intervals and the
        parameter layout: checkpoints hold full tensors, sharded or not)."""
        d = asdict(self)
        d["schedule"] = {type(self.schedule).__name__: asdict(self.schedule)}
        for key in ("eval_every", "save_every", "keep_checkpoints", "eval_batch_size", "fsdp"):
            d.pop(key)
        return d


@dataclass
class TrainResult:
    """What a training run did."""

    steps: int
    world_size: int
    resumed_from_step: int | None
    tokens_seen: int
    seconds: float
    trainable_params: int
    total_params: int
    train_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since last log)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    rank_weight_digests: list[str] = field(default_factory=list)
    step_log: list[tuple[int, float, float | None]] = field(default_factory=list)  # (step, loss, grad norm before clipping)
    sharding: dict | None = None  # FSDP runs: what each rank held (see :func:`shard_model`)

    @property
    def final_validation_loss(self) -> float | None:
        return self.validation[-1][1] if self.validation else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["final_validation_loss"] = self.final_validation_loss
        d["final_validation_ppl"] = math.exp(self.final_validation_loss) if self.final_validation_loss is not None else None
        return d


# ----------------------------------------------------------------------------- data order


def step_indices(n_blocks: int, step: int, global_batch: int, seed: int) -> torch.Tensor:
    """Block indices of optimizer step ``step``: a seeded permutation per epoch, read in order.

    Returns ``(global_batch,)``; depends only on its arguments, so a resumed run sees the same data.
    """
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n_blocks)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n_blocks, generator=g)
        out.extend(perm[offset : offset + global_batch - len(out)].tolist())
    return torch.tensor(out)


def micro_batches(indices: torch.Tensor, rank: int, world: int, accum: int, batch: int) -> list[torch.Tensor]:
    """This rank's ``accum`` micro-batches out of the step's ``world x accum x batch`` indices."""
    chunks = indices.view(accum, world, batch)  # (accum, world, batch)
    return [chunks[m, rank] for m in range(accum)]


def _take(blocks: TokenBlocks, idx: torch.Tensor, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    batch = {"input_ids": blocks.input_ids[idx], "attention_mask": blocks.attention_mask[idx], "labels": blocks.labels[idx]}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


# ----------------------------------------------------------------------------- loss


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) over the positions whose next token is scored.

    Logits ``(B, T, V)``; ``labels`` ``(B, T)`` with -100 where not scored (HF convention: position
    t predicts label t + 1).
    """
    mask = labels[:, 1:] != -100  # (B, T-1)
    s = F.log_softmax(student_logits[:, :-1][mask].float(), dim=-1)  # (n, V)
    t = F.log_softmax(teacher_logits[:, :-1][mask].float(), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def _loss(model: nn.Module, batch: dict, teacher: nn.Module | None, config: TrainConfig) -> torch.Tensor:
    out = model(**batch)
    loss = out.loss
    if teacher is not None and config.distill_weight > 0:
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kd = distill_kl(out.logits, t_logits, batch["labels"])
        loss = (1 - config.distill_weight) * loss + config.distill_weight * kd
    return loss


def validation_shares(n_blocks: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's validation blocks, padded so that every rank runs the same number of forwards.

    Returns ``(indices, real)``, both ``(ceil(n_blocks / world),)``: block ``i`` of the set goes to
    rank ``i % world``; padding repeats block 0 and has ``real == False`` (not counted in the loss).
    """
    per_rank = -(-n_blocks // world)
    slots = torch.arange(per_rank * world)[rank::world]
    real = slots < n_blocks
    return torch.where(real, slots, torch.zeros_like(slots)), real


@torch.no_grad()
def validation_loss(model: nn.Module, blocks: TokenBlocks, accelerator, batch_size: int) -> float:
    """Token-weighted mean cross-entropy over ``blocks`` (shared across processes).

    Every rank runs the same number of forwards (a sharded model gathers its layers collectively);
    the padding blocks of :func:`validation_shares` are not scored.
    """
    was_training = model.training
    model.eval()
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    idx, real = validation_shares(len(blocks), rank, world)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
    for i in range(0, len(idx), batch_size):
        batch = _take(blocks, idx[i : i + batch_size], device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:].clone()
        labels[~real[i : i + batch_size].to(device)] = -100  # padding blocks: no scored token
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="sum")
        total += torch.stack([nll.double(), (labels != -100).sum().double()])
    total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    return float(total[0] / total[1].clamp_min(1))


# ----------------------------------------------------------------------------- checkpoints


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


# ----------------------------------------------------------------------------- loop


def make_accelerator():
    """An ``Accelerator`` for this process (CPU when no accelerator device is present).

    Mixed precision is applied by :func:`autocast` rather than by accelerate, whose state is
    process-wide and refuses a second setting in the same process.
    """
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def autocast(config: TrainConfig, accelerator):
    """bf16 autocast on the training device when ``mixed_precision == "bf16"`` (weights stay fp32)."""
    device = accelerator.device.type
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16")


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(0.9, 0.95))


def _check_data(data: TrainingData) -> None:
    if len(data.train) == 0:
        raise TrainingError("no training blocks")
    if len(data.validation) == 0:
        raise TrainingError("no validation blocks")


def train(
    model: nn.Module,
    data: TrainingData,
    config: TrainConfig,
    *,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
    teacher: nn.Module | None = None,
    accelerator=None,
    progress: bool = True,
) -> TrainResult:
    """Train the parameters of ``model`` that require grad; the model is updated in place.

    Args:
        model: a causal LM taking ``input_ids, attention_mask, labels`` (plain, QAT-prepared or peft).
        data: packed train / validation blocks.
        config: hyper-parameters.
        checkpoint_dir: where ``step-N`` checkpoints go (None: no checkpoints).
        resume: continue from the last complete checkpoint in ``checkpoint_dir`` if there is one.
        teacher: frozen model for distillation (needed when ``config.distill_weight > 0``).
        accelerator: an ``accelerate.Accelerator`` (default: :func:`make_accelerator`).
        progress: show a progress bar with the loss (main process only).

    Returns:
        :class:`TrainResult` (losses, validation, tokens, time, per-rank weight digests).

    Raises:
        TrainingError: non-finite loss, or ranks ending with different weights.
        CheckpointError: a checkpoint that does not fit the model or the settings.
    """
    if config.distill_weight > 0 and teacher is None:
        raise ValueError("distill_weight > 0 needs a teacher model")
    accelerator = accelerator or make_accelerator()
    world, rank = accelerator.num_processes, accelerator.process_index
    _check_data(data)
    torch.manual_seed(config.seed + rank)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    fsdp = config.fsdp and world > 1
    if config.fsdp and world == 1:
        log.warning("fsdp: one process, nothing to shard; training unsharded")
    sharding, home = None, device_of(model)
    if fsdp:  # FSDP2 by hand (accelerate would wrap in DDP on CPU); accelerate prepares the optimizer only
        facts = shard_model(model, accelerator)
        sharding = {k: v for k, v in facts.items() if k not in ("local_numel", "local_params")}
        per_rank = gather_objects((facts["local_numel"], facts["local_params"]), world)
        sharding.update(local_numel=[a for a, _ in per_rank], local_params=[b for _, b in per_rank], total_params=total)
        if teacher is not None:
            teacher_home = device_of(teacher)
            shard_model(teacher, accelerator, reshard_root=True)
        wrapped, optimizer = model, accelerator.prepare(_optimizer(model, config))
    else:
        wrapped, optimizer = accelerator.prepare(model, _optimizer(model, config))

    start, resumed, history = 0, None, {"train_loss": [], "validation": [], "step_log": []}
    digest = data_digest(data)
    if checkpoint_dir is not None and resume and (steps := checkpoint_steps(checkpoint_dir)):
        state = load_checkpoint(_step_dir(checkpoint_dir, steps[-1]), wrapped, optimizer, accelerator, config, digest)
        start = resumed = state["step"]
        history = {"step_log": [], **state["history"]}
        log.info("resumed from %s", _step_dir(checkpoint_dir, steps[-1]))

    global_batch = config.batch_size * config.grad_accum * world
    tokens_per_step = global_batch * data.train.input_ids.shape[1]
    started = time.perf_counter()
    bar = tqdm(total=config.max_steps, initial=start, desc="train", disable=not (progress and accelerator.is_main_process))
    running: list[float] = []
    for step in range(start, config.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        idx = step_indices(len(data.train), step, global_batch, config.seed)
        step_loss = 0.0
        for m, micro in enumerate(micro_batches(idx, rank, world, config.grad_accum, config.batch_size)):
            # DDP: gradients all-reduced on the last micro-batch only. FSDP: reduce-scattered after
            # every micro-batch and accumulated sharded (skipping the sync would keep full-size
            # unsharded gradients on every rank until the last one)
            sync = m == config.grad_accum - 1
            ctx = accelerator.no_sync(wrapped) if not sync and world > 1 and not fsdp else contextlib.nullcontext()
            with ctx:
                with autocast(config, accelerator):
                    loss = _loss(wrapped, _take(data.train, micro, accelerator.device), teacher, config) / config.grad_accum
                accelerator.backward(loss)
            step_loss += float(loss.detach())
        if not math.isfinite(step_loss):
            raise TrainingError(f"loss is {step_loss} at step {step + 1}; lower lr or check the data")
        grad_norm = None
        if config.max_grad_norm is not None:
            if fsdp:  # torch clips DTensor gradients by their global norm
                params = [p for p in wrapped.parameters() if p.grad is not None]
                grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)))
            else:
                norm = accelerator.clip_grad_norm_(wrapped.parameters(), config.max_grad_norm)
                grad_norm = float(norm) if norm is not None else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        running.append(step_loss)
        history["step_log"].append((done, step_loss, grad_norm))
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{config.lr_at(step):.2e}")
        if done % 10 == 0 or done == config.max_steps:
            history["train_loss"].append((done, sum(running) / len(running)))
            running = []
        if (config.eval_every and done % config.eval_every == 0) or done == config.max_steps:
            with autocast(config, accelerator):
                val = validation_loss(wrapped, data.validation, accelerator, config.eval_batch_size)
            history["validation"].append((done, val))
            if accelerator.is_main_process and progress:
                bar.write(f"step {done}: validation loss {val:.4f} (ppl {math.exp(val):.3f})")
        if checkpoint_dir is not None and config.save_every and done % config.save_every == 0:
            save_checkpoint(checkpoint_dir, done, wrapped, optimizer, accelerator, config, history, digest)
    bar.close()
    if fsdp:  # plain again for merge / convert / save: full tensors on the device the model came on
        unshard_model(model, home)
        if teacher is not None:
            unshard_model(teacher, teacher_home)
    unwrapped = accelerator.unwrap_model(wrapped)
    unwrapped.eval()
    digests = accelerator.gather_for_metrics([weights_digest(unwrapped)], use_gather_object=True) if world > 1 else [weights_digest(unwrapped)]
    if len(set(digests)) > 1:
        raise TrainingError(f"processes ended with different weights: {digests}")
    return TrainResult(
        steps=config.max_steps, world_size=world, resumed_from_step=resumed,
        tokens_seen=tokens_per_step * (config.max_steps - start), seconds=time.perf_counter() - started,
        trainable_params=trainable, total_params=total,
        train_loss=[tuple(x) for x in history["train_loss"]], validation=[tuple(x) for x in history["validation"]],
        rank_weight_digests=list(digests), step_log=[tuple(x) for x in history["step_log"]], sharding=sharding,
    )
