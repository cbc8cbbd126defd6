"""The text of the bundled tiny model: the CPython standard library, split into training and held-out files.

:func:`collect_corpus` reads the ``*.py`` / ``*.txt`` / ``*.rst`` files of the running interpreter's
standard library and splits them by a hash of the relative path (:func:`is_heldout`). The held-out
files become the frozen evaluation data (``heldout.txt`` and ``mc.jsonl``); ``calibration.txt`` is
cut from training files. Everything is deterministic for a given Python version.
"""

from __future__ import annotations

import hashlib
import os
import platform
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

SEED = 1234
HELDOUT_PERMILLE = 30  # ~3% of the files are held out
HELDOUT_TXT_MIN_CHARS = 80_000
HELDOUT_TXT_MAX_CHARS = 115_000
CALIB_TARGET_CHARS = 150_000
CALIB_CHUNK_CHARS = 3_000
MC_ITEMS = 250
MC_CONTEXT_LINES = 8
MC_MAX_PER_FILE = 25

EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
# Build-specific files: their content depends on how the interpreter was compiled.
EXCLUDED_PREFIXES = ("config-3.", "_sysconfigdata_")
TEXT_SUFFIXES = {".py", ".txt", ".rst"}


@dataclass
class Corpus:
    """The standard-library files, split: ``(relpath, text)`` pairs sorted by relpath."""

    root: Path
    train: list[tuple[str, str]] = field(default_factory=list)  # (relpath, text), sorted by relpath
    heldout: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # not valid UTF-8


def _path_bucket(relpath: str) -> int:
    return int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big") % 1000


def is_heldout(relpath: str) -> bool:
    return _path_bucket(relpath) < HELDOUT_PERMILLE


def _excluded(rel: Path) -> bool:
    parts = rel.parts
    if any(p in EXCLUDED_DIRS for p in parts[:-1]):
        return True
    if parts[0].startswith(EXCLUDED_PREFIXES) or rel.name.startswith(EXCLUDED_PREFIXES):
        return True
    # lib2to3/tests and idlelib/idle_test are covered by EXCLUDED_DIRS.
    return rel.suffix not in TEXT_SUFFIXES


def collect_corpus(stdlib: str | None = None) -> Corpus:
    """Read and split the text files under ``stdlib`` (default: the running interpreter's)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"]).resolve()
    corpus = Corpus(root=root)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in filenames:
            rel = Path(dirpath, name).relative_to(root)
            if not _excluded(rel):
                files.append(rel.as_posix())
    for rel in sorted(files):
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            corpus.skipped.append(rel)
            continue
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not text.strip():
            continue
        (corpus.heldout if is_heldout(rel) else corpus.train).append((rel, text))
    return corpus


def split_heldout(corpus: Corpus) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Held-out files -> (files concatenated into heldout.txt, files used for mc.jsonl)."""
    ppl_files, mc_files, total = [], [], 0
    for rel, text in corpus.heldout:
        if total < HELDOUT_TXT_MIN_CHARS and total + len(text) <= HELDOUT_TXT_MAX_CHARS:
            ppl_files.append((rel, text))
            total += len(text)
        else:
            mc_files.append((rel, text))
    return ppl_files, mc_files


def build_heldout_text(ppl_files: list[tuple[str, str]]) -> str:
    return "\n\n".join(text.rstrip("\n") for _, text in ppl_files) + "\n"


def build_calibration_text(corpus: Corpus) -> str:
    """Line-aligned ~3 KB chunks from training files, chosen with a fixed seed."""
    rng = random.Random(SEED + 1)
    files = [f for f in corpus.train if len(f[1]) > 2 * CALIB_CHUNK_CHARS]
    rng.shuffle(files)
    chunks, total = [], 0
    for _, text in files:
        if total >= CALIB_TARGET_CHARS:
            break
        start = rng.randrange(0, len(text) - CALIB_CHUNK_CHARS)
        start = text.rfind("\n", 0, start) + 1
        end = text.rfind("\n", start, start + CALIB_CHUNK_CHARS)
        chunk = text[start:end].strip("\n")
        if chunk:
            chunks.append(chunk)
            total += len(chunk) + 2
    return "\n\n".join(chunks) + "\n"


def _mc_line_ok(line: str) -> bool:
    s = line.strip()
    return 12 <= len(s) <= 80 and not s.startswith("#")


def build_mc_items(mc_files: list[tuple[str, str]], n_items: int = MC_ITEMS) -> list[dict]:
    """Next-line prediction: context = MC_CONTEXT_LINES consecutive lines, gold = the next line,
    distractors = lines of similar length from *other* held-out files, re-indented like the gold
    line so that indentation alone does not give the answer."""
    rng = random.Random(SEED + 2)
    lines_by_file = [(rel, text.split("\n")) for rel, text in mc_files]
    pool = [
        (fi, line.strip())
        for fi, (_, lines) in enumerate(lines_by_file)
        for line in lines
        if _mc_line_ok(line)
    ]
    candidates = []
    for fi, (_, lines) in enumerate(lines_by_file):
        for i in range(MC_CONTEXT_LINES, len(lines)):
            ctx = lines[i - MC_CONTEXT_LINES : i]
            if _mc_line_ok(lines[i]) and sum(bool(c.strip()) for c in ctx) >= MC_CONTEXT_LINES // 2:
                candidates.append((fi, i))
    rng.shuffle(candidates)
    items, used, per_file = [], set(), [0] * len(lines_by_file)
    for fi, i in candidates:
        if len(items) >= n_items:
            break
        if per_file[fi] >= MC_MAX_PER_FILE:
            continue
        lines = lines_by_file[fi][1]
        gold = lines[i]
        # keep items apart from each other within a file
        if any((fi, j) in used for j in range(i - MC_CONTEXT_LINES, i + MC_CONTEXT_LINES + 1)):
            continue
        indent = gold[: len(gold) - len(gold.lstrip())]
        glen = len(gold.strip())
        similar = [s for f, s in pool if f != fi and abs(len(s) - glen) <= max(3, glen // 5) and s != gold.strip()]
        similar = sorted(set(similar))
        if len(similar) < 3:
            continue
        distractors = [indent + s for s in rng.sample(similar, 3)]
        choices = ["\n" + gold] + ["\n" + d for d in distractors]
        order = list(range(4))
        rng.shuffle(order)
        items.append(
            {
                "context": "\n".join(lines[i - MC_CONTEXT_LINES : i]),
                "choices": [choices[k] for k in order],
                "gold": order.index(0),
            }
        )
        used.add((fi, i))
        per_file[fi] += 1
    return items


def write_data_license(data_dir: Path, corpus: Corpus, ppl_files, mc_files, mc_items, calib_text, heldout_text) -> None:
    """Write ``data_dir/LICENSE-DATA.md``: where the text comes from, its license, how it was split."""
    text = f"""# Data: origin and license

All text in this directory, and the text the bundled `tiny_deepseek_v3` model was trained on,
comes from the standard library of CPython {platform.python_version()}
(`sysconfig.get_paths()["stdlib"]`), which is distributed under the
Python Software Foundation License Version 2 (https://docs.python.org/3/license.html).
Copyright (c) 2001 Python Software Foundation; All Rights Reserved. The text is used unmodified
(line endings normalised to `\\n`).

## Corpus

All `*.py`, `*.txt` and `*.rst` files under the stdlib directory, recursively, excluding
`site-packages/`, any `test/` or `tests/` directory (so also `lib2to3/tests`), `idlelib/idle_test/`,
`__pycache__/`, and the build-specific `config-3.*/` and `_sysconfigdata_*.py`. Files that are not valid
UTF-8 are skipped. Files are sorted by relative path, so the corpus is the same on every machine
with the same Python version.

## Split

A file is held out when `int.from_bytes(sha256(relpath).digest()[:8], "big") % 1000 < {HELDOUT_PERMILLE}`
(about 3% of the files). This gives {len(corpus.train)} training files and {len(corpus.heldout)} held-out files.
The tokenizer and the model were trained on the training files only.

- `heldout.txt` ({len(heldout_text):,} characters): held-out files, in path order, concatenated
  (blank line between files) until at least {HELDOUT_TXT_MIN_CHARS:,} characters:
  {", ".join(f"`{r}`" for r, _ in ppl_files)}.
- `mc.jsonl` ({len(mc_items)} items): built from the remaining held-out files, which do not overlap
  `heldout.txt`: {", ".join(f"`{r}`" for r, _ in mc_files)}.
  Each item: `context` = {MC_CONTEXT_LINES} consecutive lines of a file, the gold choice = the next
  line, 3 distractors = lines of similar length (within 20%) from the other MC files, re-indented
  like the gold line (at most {MC_MAX_PER_FILE} items per file, items at least {MC_CONTEXT_LINES} lines
  apart); every choice starts with the `\\n` that joins it to the context; choice order
  shuffled with a fixed seed. Score a choice by the log-likelihood of the choice text given the context.
- `calibration.txt` ({len(calib_text):,} characters): line-aligned chunks of about {CALIB_CHUNK_CHARS:,} characters
  from randomly chosen (fixed seed) training files, blank line between chunks.

Everything is regenerated by `python -m dsq.tools.train_tiny`.
"""
    (data_dir / "LICENSE-DATA.md").write_text(text, encoding="utf-8")
