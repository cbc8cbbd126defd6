"""Bundled assets: a tiny trained DeepSeek-V3 checkpoint and its benchmark sets.

``tiny_deepseek_v3/`` is produced by ``python -m dsq.tools.train_tiny``; ``data/`` holds the
frozen held-out text split, a multiple-choice set built from held-out text and a calibration
sample (CPython standard library text, PSF License; see ``data/LICENSE-DATA.md``).
"""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent


def tiny_model_dir() -> Path:
    """The bundled tiny DeepSeek-V3 checkpoint directory."""
    return ASSETS / "tiny_deepseek_v3"


def tiny_v4_model_dir() -> Path:
    """The bundled tiny DeepSeek-V4 checkpoint directory (made by ``python -m dsq.tools.train_tiny_v4``).

    It shares the tokenizer and the ``data/`` benchmark sets of :func:`tiny_model_dir`; recipes name it
    by path (``model: dsq/assets/tiny_deepseek_v4`` from the repository root).
    """
    return ASSETS / "tiny_deepseek_v4"


def data_file(name: str) -> Path:
    """A bundled data file: ``heldout.txt``, ``mc.jsonl`` or ``calibration.txt``."""
    return ASSETS / "data" / name


BUNDLED_PREFIX = "bundled:"


def resolve_data_path(text: str) -> Path:
    """A recipe's data path: ``bundled:NAME`` is a file shipped in ``data/``, anything else a local path."""
    if text.startswith(BUNDLED_PREFIX):
        return data_file(text[len(BUNDLED_PREFIX):])
    return Path(text).expanduser()
