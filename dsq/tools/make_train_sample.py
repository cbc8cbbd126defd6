"""Build ``data/train_sample.txt``: whole files of the bundled model's own training split.

QAT wants text from the distribution the model was trained on, more of it than the 150 KB
calibration sample. The script takes the CPython standard library files that
:mod:`dsq.tools.train_tiny` put in the *training* split (never a held-out file), orders them
by the hex sha256 of their relative path (a fixed shuffle), takes each file of 2,000..30,000
characters that still fits in the 1,000,000-character budget, sorts the chosen ones by path
and joins them unmodified with one form feed between files (one document per file for
:func:`dsq.finetune.data.split_documents`). The same Python version gives the same file.

Usage::

    python -m dsq.tools.make_train_sample [--out DIR]
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from dsq.tools.train_tiny import collect_corpus, is_heldout
from dsq.assets import ASSETS

BUDGET_CHARS = 1_000_000
MIN_FILE_CHARS, MAX_FILE_CHARS = 2_000, 30_000


def choose(files: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Training-split files in hash order, each taken while it fits in the budget."""
    chosen, total = [], 0
    for rel, text in sorted(files, key=lambda f: hashlib.sha256(f[0].encode()).hexdigest()):
        if is_heldout(rel) or "\f" in text or not MIN_FILE_CHARS <= len(text) <= MAX_FILE_CHARS:
            continue
        if total + len(text) + 1 <= BUDGET_CHARS:
            chosen.append((rel, text))
            total += len(text) + 1
    return sorted(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ASSETS / "data"))
    args = parser.parse_args(argv)
    files = choose(collect_corpus().train)
    text = "\f".join(t for _, t in files)
    Path(args.out, "train_sample.txt").write_text(text, encoding="utf-8")
    print(f"train_sample.txt: {len(files)} files, {len(text):,} characters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
