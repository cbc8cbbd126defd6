"""Cached calibration activations that go to disk beyond a memory budget.

The layer-sequential driver keeps one block's inputs for every calibration batch (and learned
rounding keeps the block's full-precision outputs beside them). With many samples, long sequences
or a wide model these exceed memory; a :class:`BatchStore` keeps batches in memory up to its
budget and writes the rest, one safetensors file per batch, into a temporary directory of its own
that is removed when the store is closed or collected.

Example:
    >>> store = BatchStore(budget_bytes=256 << 20)
    >>> for x in batches:
    ...     store.append(layer(x))
    >>> store[3].shape, store.spilled
"""
from __future__ import annotations

import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class BatchStore(Sequence[torch.Tensor]):
    """Per-batch tensors: in memory up to ``budget_bytes`` in all, the rest on disk.

    Args:
        budget_bytes: bytes held in memory; None: everything stays in memory.
        directory: parent of the store's temporary directory (default: the system's).
    """

    def __init__(self, budget_bytes: int | None = None, directory: str | Path | None = None) -> None:
        self.budget_bytes = budget_bytes
        self._parent = directory
        self._memory: list[torch.Tensor | None] = []
        self._files: list[tuple[Path, torch.device] | None] = []
        self._held = 0
        self._tmp: tempfile.TemporaryDirectory | None = None

    @classmethod
    def of(cls, tensors: Iterable[torch.Tensor], budget_bytes: int | None = None) -> BatchStore:
        store = cls(budget_bytes)
        for t in tensors:
            store.append(t)
        return store

    def _dir(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dsq-activations-", dir=self._parent)
            weakref.finalize(self, self._tmp.cleanup)
        return Path(self._tmp.name)

    def append(self, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self.budget_bytes is None or self._held + size <= self.budget_bytes:
            self._memory.append(t)
            self._files.append(None)
            self._held += size
            return
        path = self._dir() / f"{len(self._memory)}.safetensors"
        save_file({"t": t.detach().contiguous().cpu()}, str(path))
        self._memory.append(None)
        self._files.append((path, t.device))

    def __len__(self) -> int:
        return len(self._memory)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        t = self._memory[i]
        if t is not None:
            return t
        path, device = self._files[i]
        return load_file(str(path))["t"].to(device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    @property
    def spilled(self) -> int:
        """Batches held on disk."""
        return sum(f is not None for f in self._files)

    @property
    def held_bytes(self) -> int:
        """Bytes held in memory."""
        return self._held

    def close(self) -> None:
        """Remove the store's files (only the directory it created)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self._memory, self._files, self._held = [], [], 0

