"""Build the bundled fine-tuning domain data from the Python sources of the installed SymPy.

The bundled tiny model was trained on the CPython standard library; SymPy's sources are a
new *domain* for adaptation (LoRA, QAT) that the model has not seen. The script

1. collects ``sympy/**/*.py`` (relative paths like ``sympy/core/expr.py``), leaving out test
   and benchmark code, generated ANTLR parsers and the two sub-packages with a license of
   their own (``sympy/parsing/latex``: MIT; ``sympy/multipledispatch``), files that are not
   UTF-8 or that hold a form feed, and files outside 1,000..12,000 characters;
2. assigns each file to train or held-out by a stable hash of its relative path
   (``int.from_bytes(sha256(relpath).digest()[:8], "big") % 100 < 20``: held out);
3. goes through the files of each part in the order of the hex sha256 of their path (a fixed
   shuffle), taking each one that still fits in the size budget (300,000 characters for train,
   60,000 held out), sorts the chosen ones by path and joins their text,
   unmodified, with one form feed (``"\\f"``) between files, so
   :func:`dsq.finetune.data.split_documents` gives one document per file;
4. writes ``data/domain_train.txt``, ``data/domain_heldout.txt`` and the "Fine-tuning domain
   data" section of ``data/LICENSE-DATA.md`` (replacing an earlier version of the section).

The same SymPy version gives byte-identical files.

Usage::

    python -m dsq.tools.make_domain_data [--out DIR]
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from dsq.assets import ASSETS

TRAIN_BUDGET_CHARS = 300_000
HELDOUT_BUDGET_CHARS = 60_000
HELDOUT_PERCENT = 20
MIN_FILE_CHARS = 1_000
MAX_FILE_CHARS = 12_000  # many small documents rather than a few large ones
EXCLUDED_DIRS = {"tests", "test-examples", "benchmarks", "__pycache__", "_antlr"}
EXCLUDED_PREFIXES = ("sympy/parsing/latex/", "sympy/multipledispatch/")
SECTION_TITLE = "## Fine-tuning domain data (SymPy)"

_LICENSE_NOTICE = """\
Copyright (c) 2006-2023 SymPy Development Team

All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

  a. Redistributions of source code must retain the above copyright notice,
     this list of conditions and the following disclaimer.
  b. Redistributions in binary form must reproduce the above copyright
     notice, this list of conditions and the following disclaimer in the
     documentation and/or other materials provided with the distribution.
  c. Neither the name of SymPy nor the names of its contributors
     may be used to endorse or promote products derived from this software
     without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE
ARE DISCLAIMED. IN NO EVENT SHALL THE REGENTS OR CONTRIBUTORS BE LIABLE FOR
ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT
LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY
OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH
DAMAGE.
"""


def _digest(relpath: str) -> bytes:
    return hashlib.sha256(relpath.encode("utf-8")).digest()


def is_heldout(relpath: str) -> bool:
    """Whether a file (path relative to the site directory, ``/``-separated) is held out."""
    return int.from_bytes(_digest(relpath)[:8], "big") % 100 < HELDOUT_PERCENT


def _excluded(relpath: str) -> bool:
    parts = relpath.split("/")
    return bool(EXCLUDED_DIRS.intersection(parts[:-1])) or relpath.startswith(EXCLUDED_PREFIXES)


def collect_files(package_dir: Path) -> list[tuple[str, str]]:
    """Return ``(relpath, text)`` of the eligible ``.py`` files, sorted by relative path."""
    files = []
    for path in sorted(package_dir.rglob("*.py")):
        relpath = path.relative_to(package_dir.parent).as_posix()
        if _excluded(relpath):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if "\f" not in text and MIN_FILE_CHARS <= len(text) <= MAX_FILE_CHARS:
            files.append((relpath, text))
    return sorted(files)


def select(files: list[tuple[str, str]], heldout: bool, budget: int) -> list[tuple[str, str]]:
    """Files of one part taken in hash order while they fit in ``budget`` characters; sorted by path."""
    part = sorted((f for f in files if is_heldout(f[0]) == heldout), key=lambda f: _digest(f[0]).hex())
    chosen: list[tuple[str, str]] = []
    size = 0
    for relpath, text in part:
        added = len(text) + (1 if chosen else 0)  # the form feed before it
        if size + added > budget:
            continue
        chosen.append((relpath, text))
        size += added
    return sorted(chosen)


def join_files(files: list[tuple[str, str]]) -> str:
    """The files' text, unmodified, with one form feed between files."""
    return "\f".join(text for _, text in files)


def license_section(version: str, train: list[tuple[str, str]], heldout: list[tuple[str, str]]) -> str:
    """The LICENSE-DATA.md section describing the domain files."""
    train_text, heldout_text = join_files(train), join_files(heldout)
    names = ", ".join(f"`{relpath}`" for relpath, _ in heldout)
    return f"""{SECTION_TITLE}

`domain_train.txt` ({len(train_text):,} characters, {len(train)} files) and `domain_heldout.txt`
({len(heldout_text):,} characters, {len(heldout)} files) are Python sources of SymPy {version}
(https://www.sympy.org, BSD-3-Clause; the notice below), used unmodified, one file per
form-feed-separated document. They are not part of the CPython standard library, so they are a
domain the bundled model has not seen (for fine-tuning and adaptation experiments).
Test code and examples, benchmarks, generated ANTLR parsers, `sympy/parsing/latex` (MIT) and
`sympy/multipledispatch` are left out. A file is held out when
`int.from_bytes(sha256(relpath).digest()[:8], "big") % 100 < {HELDOUT_PERCENT}` (relpath like
`sympy/core/expr.py`); files of {MIN_FILE_CHARS:,} to {MAX_FILE_CHARS:,} characters are taken in
hash order while they fit in {TRAIN_BUDGET_CHARS:,} (train) and {HELDOUT_BUDGET_CHARS:,} (held-out)
characters, and written in path order. Held-out files: {names}.

Regenerate with `python -m dsq.tools.make_domain_data` (same SymPy version: identical files).

SymPy's license (parts of SymPy taken from the Diofant project carry the same BSD-3-Clause
terms, Copyright (c) 2006-2018 SymPy Development Team, 2013-2023 Sergey B Kirpichev):

```
{_LICENSE_NOTICE}```
"""


def write_license_section(license_path: Path, section: str) -> None:
    """Append ``section`` to the license file, replacing an earlier version of it."""
    text = license_path.read_text(encoding="utf-8") if license_path.exists() else ""
    if SECTION_TITLE in text:
        text = text[: text.index(SECTION_TITLE)]
    license_path.write_text(text.rstrip("\n") + "\n\n" + section, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="assets root (default: dsq/assets)")
    args = parser.parse_args(argv)
    import sympy

    files = collect_files(Path(sympy.__file__).resolve().parent)
    train = select(files, heldout=False, budget=TRAIN_BUDGET_CHARS)
    heldout = select(files, heldout=True, budget=HELDOUT_BUDGET_CHARS)
    data_dir = args.out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("domain_train.txt", train), ("domain_heldout.txt", heldout)):
        text = join_files(part)
        (data_dir / name).write_text(text, encoding="utf-8", newline="\n")
        print(f"{name}: {len(part)} files, {len(text):,} characters")
    write_license_section(data_dir / "LICENSE-DATA.md", license_section(sympy.__version__, train, heldout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
