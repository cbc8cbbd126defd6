"""The processes of a multi-process run (``torchrun --nproc_per_node N -m dsq run RECIPE``).

Calibration splits its batches across the processes (ranks) of a ``torch.distributed`` process group:
gloo on CPU, NCCL on GPUs. :class:`Ranks` is what the calibration code needs from the group: this
process's share of a list, sums and maxima over every process, and results solved by one process
handed to all. A run without a process group is one rank of one, and every collective is a no-op.

Example:
    >>> ranks = Ranks()            # one process
    >>> ranks.share(10)
    range(0, 10)
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import RecipeError

TIMEOUT = datetime.timedelta(hours=2)  # a rank may wait on another's whole layer (a large MoE layer's solves)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world`` processes (rank 0 is the main one).

    ``collective_device``: where collectives need their tensors (``"cuda"`` for NCCL; None: where they are).
    """

    rank: int = 0
    world: int = 1
    collective_device: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1

    def share(self, count: int) -> range:
        """This rank's contiguous share of ``count`` items (the first ``count % world`` ranks get one more)."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def owner(self, index: int) -> int:
        """The rank that computes item ``index`` of a list every rank walks (round robin)."""
        return index % self.world

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over every rank, in place (every rank gets the total)."""
        return self._collective(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum of ``tensor`` over every rank, in place."""
        return self._collective(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX))

    def broadcast_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """``src``'s ``tensor`` to every rank, in place (the others pass a tensor of the same shape and dtype)."""
        return self._collective(tensor, lambda t: dist.broadcast(t, src=src))

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's ``rows`` ``[n_r, C]`` concatenated in rank order ``[sum n_r, C]``, on every rank."""
        if not self.several:
            return rows
        count = self._collective_copy(torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device))
        counts = [torch.zeros_like(count) for _ in range(self.world)]
        dist.all_gather(counts, count)
        sizes = [int(c.item()) for c in counts]
        padded = torch.zeros(max(sizes), *rows.shape[1:], dtype=rows.dtype, device=count.device)
        padded[: rows.shape[0]] = rows.to(count.device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(rows.device)

    def _collective_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` where collectives need it (a copy on the GPU for NCCL)."""
        return tensor.to(self.collective_device) if self.collective_device is not None else tensor

    def _collective(self, tensor: torch.Tensor, op) -> torch.Tensor:
        if not self.several:
            return tensor
        if self.collective_device is None or tensor.device.type == torch.device(self.collective_device).type:
            op(tensor)
            return tensor
        moved = tensor.to(self.collective_device)  # NCCL works on GPU tensors only
        op(moved)
        return tensor.copy_(moved)

    def barrier(self) -> None:
        if self.several:
            dist.barrier()


SINGLE = Ranks()


def current_ranks() -> Ranks:
    """The ranks of the initialized default process group, or :data:`SINGLE`."""
    if dist.is_available() and dist.is_initialized():
        nccl = dist.get_backend() == "nccl"
        return Ranks(dist.get_rank(), dist.get_world_size(), "cuda" if nccl else None)
    return SINGLE


def launched_ranks() -> int:
    """Processes the launcher started (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_launched_group(device: str | None) -> Ranks:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1): NCCL when calibrating on a CUDA device
    (each rank on ``cuda:LOCAL_RANK``), gloo otherwise. One process: :data:`SINGLE`, nothing initialized.

    Raises:
        RecipeError: several processes with a device that cannot be shared out (a named ``cuda:N``).
    """
    if launched_ranks() <= 1:
        return SINGLE
    if dist.is_initialized():
        return current_ranks()
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda and torch.device(device).index is not None:
        raise RecipeError(f"quantize.device: {device!r} names one GPU; with several processes use 'cuda' (each rank takes cuda:LOCAL_RANK)")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT)
    return current_ranks()


def leave_group() -> None:
    """End the process group once the collective work is done, so that libraries the main rank calls
    afterwards (transformers, compressed-tensors) do not wait on collectives the other ranks never join."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
