"""Reading local data sets through ``datasets``: files and ``save_to_disk`` directories.

Shared by calibration (``dsq.quantize.calibration_data``) and fine-tuning (``dsq.finetune.data``).
Files are read with a packaged builder into memory through a throw-away cache directory, so
nothing is written to the user's cache and an edited file is always re-read. Nothing is
unpickled and no remote code runs. Every error is a :class:`~dsq.core.errors.DataError` whose message
starts with the caller's ``description`` of the source (e.g. ``"calibration file /x.jsonl"``).
"""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import datasets

from dsq.core.errors import DataError

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
"""File suffixes a data path may have (a directory is read with ``load_from_disk``)."""

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide ``datasets`` progress bars for the duration, restoring the previous setting."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def load_file(path: Path, description: str) -> datasets.Dataset:
    """Read a local file with a packaged builder, uncached and in memory (a ``.txt`` file is one row)."""
    if not path.exists():
        raise DataError(f"{description} does not exist")
    if not path.is_file():
        raise DataError(f"{description} is neither a file nor a directory")
    suffix = path.suffix.lower()
    if suffix not in BUILDERS:
        raise DataError(
            f"{description}: unsupported suffix {suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)} "
            f"or a directory written by datasets' save_to_disk"
        )
    if path.stat().st_size == 0:
        raise DataError(f"{description} is empty (0 bytes, 0 documents)")
    options = {"sample_by": "document"} if suffix == ".txt" else {}  # the whole file, byte for byte, in one row
    try:
        with quiet_progress(), tempfile.TemporaryDirectory(prefix="dsq-data-") as cache_dir:
            return datasets.load_dataset(
                BUILDERS[suffix], data_files=str(path), split="train",
                cache_dir=cache_dir,  # fresh per call: an edited file is always re-read
                keep_in_memory=True, **options,
            )
    except Exception as exc:  # the builders raise many unrelated types for bad files
        raise DataError(f"cannot read {description} as {BUILDERS[suffix]}: {exc}") from exc


def load_directory(path: Path, split: str, description: str) -> datasets.Dataset:
    """Read a ``save_to_disk`` directory; pick ``split`` from a ``DatasetDict``."""
    try:
        with quiet_progress():
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
    except Exception as exc:  # FileNotFoundError for plain folders, others for damaged ones
        raise DataError(
            f"{description} is not a dataset written by datasets' save_to_disk ({exc}); "
            f"pass a file ({', '.join(SUPPORTED_SUFFIXES)}) or such a directory"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{description} has no split {split!r} (splits: {sorted(loaded)}); set split")
        return loaded[split]
    return loaded
