"""Training hyper-parameters: the learning-rate schedules and :class:`TrainConfig`."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


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
