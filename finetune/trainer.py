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
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dsq.core.errors import TrainingError

from .fsdp import device_of, full_tensor, gather_objects, shard_model, unshard_model
from .train_checkpoint import (
    CHECKPOINT_VERSION, _step_dir, checkpoint_steps, data_digest, load_checkpoint, save_checkpoint, trainable_state,
    weights_digest,
)
from .train_config import Constant, Cosine, Linear, Schedule, TrainConfig

if TYPE_CHECKING:
    from .data import TokenBlocks, TrainingData

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class _Run:
    """What the training loop drives, once the model is prepared (wrapped in DDP, or sharded)."""

    accelerator: Any
    config: TrainConfig
    wrapped: nn.Module  # what forward and backward run on: the DDP wrapper, or the sharded model itself
    optimizer: torch.optim.Optimizer
    teacher: nn.Module | None
    fsdp: bool
    sharding: dict | None  # FSDP runs: what each rank held
    model_home: torch.device  # where the model's parameters were before sharding
    teacher_home: torch.device | None


def _shard(model: nn.Module, accelerator, total: int) -> dict:
    """Shard ``model`` (FSDP2) and return what every rank holds, for :attr:`TrainResult.sharding`."""
    facts = shard_model(model, accelerator)
    sharding = {k: v for k, v in facts.items() if k not in ("local_numel", "local_params")}
    per_rank = gather_objects((facts["local_numel"], facts["local_params"]), accelerator.num_processes)
    sharding.update(local_numel=[a for a, _ in per_rank], local_params=[b for _, b in per_rank], total_params=total)
    return sharding


def _prepare(model: nn.Module, teacher: nn.Module | None, config: TrainConfig, accelerator, total: int) -> _Run:
    """Wrap the model in DDP (accelerate), or shard it and the teacher (FSDP2), and build the optimizer."""
    fsdp = config.fsdp and accelerator.num_processes > 1
    if config.fsdp and not fsdp:
        log.warning("fsdp: one process, nothing to shard; training unsharded")
    home = device_of(model)
    if not fsdp:
        wrapped, optimizer = accelerator.prepare(model, _optimizer(model, config))
        return _Run(accelerator, config, wrapped, optimizer, teacher, False, None, home, None)
    # FSDP2 by hand (accelerate would wrap in DDP on CPU); accelerate prepares the optimizer only
    sharding = _shard(model, accelerator, total)
    teacher_home = None
    if teacher is not None:
        teacher_home = device_of(teacher)
        shard_model(teacher, accelerator, reshard_root=True)
    optimizer = accelerator.prepare(_optimizer(model, config))
    return _Run(accelerator, config, model, optimizer, teacher, True, sharding, home, teacher_home)


def _resume(run: _Run, checkpoint_dir: Path | None, digest: str) -> tuple[int, int | None, dict]:
    """``(first step, step resumed from or None, loss history)`` from the last complete checkpoint."""
    history: dict = {"train_loss": [], "validation": [], "step_log": []}
    if checkpoint_dir is None or not (steps := checkpoint_steps(checkpoint_dir)):
        return 0, None, history
    path = _step_dir(checkpoint_dir, steps[-1])
    state = load_checkpoint(path, run.wrapped, run.optimizer, run.accelerator, run.config, digest)
    log.info("resumed from %s", path)
    return state["step"], state["step"], {"step_log": [], **state["history"]}


def _backward_micro_batches(run: _Run, data: TrainingData, step: int) -> float:
    """Forward and backward over this rank's micro-batches of optimizer step ``step``; returns the step's loss."""
    accelerator, config = run.accelerator, run.config
    rank, world = accelerator.process_index, accelerator.num_processes
    global_batch = config.batch_size * config.grad_accum * world
    idx = step_indices(len(data.train), step, global_batch, config.seed)
    step_loss = 0.0
    for m, micro in enumerate(micro_batches(idx, rank, world, config.grad_accum, config.batch_size)):
        # DDP: gradients all-reduced on the last micro-batch only. FSDP: reduce-scattered after
        # every micro-batch and accumulated sharded (skipping the sync would keep full-size
        # unsharded gradients on every rank until the last one)
        sync = m == config.grad_accum - 1
        ctx = accelerator.no_sync(run.wrapped) if not sync and world > 1 and not run.fsdp else contextlib.nullcontext()
        with ctx:
            with autocast(config, accelerator):
                batch = _take(data.train, micro, accelerator.device)
                loss = _loss(run.wrapped, batch, run.teacher, config) / config.grad_accum
            accelerator.backward(loss)
        step_loss += float(loss.detach())
    return step_loss


def _clip_gradients(run: _Run) -> float | None:
    """Clip the global gradient norm to ``max_grad_norm``; returns the norm before clipping (None: off)."""
    if run.config.max_grad_norm is None:
        return None
    if run.fsdp:  # torch clips DTensor gradients by their global norm
        params = [p for p in run.wrapped.parameters() if p.grad is not None]
        return float(full_tensor(torch.nn.utils.clip_grad_norm_(params, run.config.max_grad_norm)))
    norm = run.accelerator.clip_grad_norm_(run.wrapped.parameters(), run.config.max_grad_norm)
    return float(norm) if norm is not None else None


def _optimizer_step(run: _Run, data: TrainingData, step: int) -> tuple[float, float | None]:
    """One optimizer step (0-based ``step``); returns ``(loss, gradient norm before clipping)``."""
    for group in run.optimizer.param_groups:
        group["lr"] = run.config.lr_at(step)
    step_loss = _backward_micro_batches(run, data, step)
    if not math.isfinite(step_loss):
        raise TrainingError(f"loss is {step_loss} at step {step + 1}; lower lr or check the data")
    grad_norm = _clip_gradients(run)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm


def _validate(run: _Run, data: TrainingData, done: int, history: dict, bar: tqdm, progress: bool) -> None:
    """Validation loss after step ``done``, appended to ``history`` (and shown on the main process)."""
    with autocast(run.config, run.accelerator):
        val = validation_loss(run.wrapped, data.validation, run.accelerator, run.config.eval_batch_size)
    history["validation"].append((done, val))
    if run.accelerator.is_main_process and progress:
        bar.write(f"step {done}: validation loss {val:.4f} (ppl {math.exp(val):.3f})")


def _loop(run: _Run, data: TrainingData, start: int, history: dict, checkpoint_dir: Path | None, digest: str,
          progress: bool) -> None:
    """Optimizer steps ``start .. max_steps - 1`` with logging, validation and checkpoints into ``history``."""
    config = run.config
    show = progress and run.accelerator.is_main_process
    bar = tqdm(total=config.max_steps, initial=start, desc="train", disable=not show)
    running: list[float] = []
    for step in range(start, config.max_steps):
        step_loss, grad_norm = _optimizer_step(run, data, step)
        done = step + 1
        running.append(step_loss)
        history["step_log"].append((done, step_loss, grad_norm))
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{config.lr_at(step):.2e}")
        if done % 10 == 0 or done == config.max_steps:
            history["train_loss"].append((done, sum(running) / len(running)))
            running = []
        if (config.eval_every and done % config.eval_every == 0) or done == config.max_steps:
            _validate(run, data, done, history, bar, progress)
        if checkpoint_dir is not None and config.save_every and done % config.save_every == 0:
            save_checkpoint(checkpoint_dir, done, run.wrapped, run.optimizer, run.accelerator, config, history, digest)
    bar.close()


def _finish(run: _Run, model: nn.Module) -> list[str]:
    """Make a sharded model plain again and check that every rank ends with the same weights.

    Returns:
        The per-rank digests of the trainable weights (:func:`weights_digest`).
    """
    if run.fsdp:  # plain again for merge / convert / save: full tensors on the device the model came on
        unshard_model(model, run.model_home)
        if run.teacher is not None:
            unshard_model(run.teacher, run.teacher_home)
    unwrapped = run.accelerator.unwrap_model(run.wrapped)
    unwrapped.eval()
    if run.accelerator.num_processes > 1:
        digests = run.accelerator.gather_for_metrics([weights_digest(unwrapped)], use_gather_object=True)
    else:
        digests = [weights_digest(unwrapped)]
    if len(set(digests)) > 1:
        raise TrainingError(f"processes ended with different weights: {digests}")
    return list(digests)


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
    world = accelerator.num_processes
    _check_data(data)
    torch.manual_seed(config.seed + accelerator.process_index)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    run = _prepare(model, teacher, config, accelerator, total)
    digest = data_digest(data)
    start, resumed, history = _resume(run, checkpoint_dir if resume else None, digest)
    tokens_per_step = config.batch_size * config.grad_accum * world * data.train.input_ids.shape[1]
    started = time.perf_counter()
    _loop(run, data, start, history, checkpoint_dir, digest, progress)
    digests = _finish(run, model)
    return TrainResult(
        steps=config.max_steps, world_size=world, resumed_from_step=resumed,
        tokens_seen=tokens_per_step * (config.max_steps - start), seconds=time.perf_counter() - started,
        trainable_params=trainable, total_params=total,
        train_loss=[tuple(x) for x in history["train_loss"]], validation=[tuple(x) for x in history["validation"]],
        rank_weight_digests=digests, step_log=[tuple(x) for x in history["step_log"]], sharding=run.sharding,
    )


__all__ = [
    "CHECKPOINT_VERSION",
    "Constant",
    "Cosine",
    "Linear",
    "Schedule",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "autocast",
    "checkpoint_steps",
    "data_digest",
    "distill_kl",
    "load_checkpoint",
    "make_accelerator",
    "micro_batches",
    "save_checkpoint",
    "step_indices",
    "train",
    "trainable_state",
    "validation_loss",
    "validation_shares",
    "weights_digest",
]
