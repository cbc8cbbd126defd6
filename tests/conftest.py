"""Shared fixtures: tiny checkpoints of every supported architecture."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

# Nothing is fetched at run time, as under the CLI: set before transformers and huggingface_hub are
# imported (bitsandbytes 0.50 on an AVX512-BF16 CPU otherwise asks the hub for a CPU kernel on import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from dsq.tools.testing import make_tiny_checkpoint  # noqa: E402

TinyCheckpoint = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    """Return ``get(model_type, shards=1) -> Path``, a tiny checkpoint made once per session.

    The directories are shared by all tests: copy one before modifying it.
    """
    made: dict[tuple[str, int], Path] = {}

    def get(model_type: str, shards: int = 1) -> Path:
        key = (model_type, shards)
        if key not in made:
            root = tmp_path_factory.mktemp(f"tiny_{model_type}_{shards}")
            made[key] = make_tiny_checkpoint(model_type, root, shards=shards)
        return made[key]

    return get


@pytest.fixture(scope="session")
def tiny_deepseek_v3(tiny_checkpoint: TinyCheckpoint) -> Path:
    """A shared tiny DeepSeek-V3 checkpoint (read-only; copy it before modifying)."""
    return tiny_checkpoint("deepseek_v3")
