"""The sha256 of the weight files of every variant of ``rtn_sweep.py`` and ``ptq_sweep.py``.

Runs each variant's quantization and save only (no evaluation, no reload check), so a change to
dsq's code can be checked to leave the artifacts byte for byte as they were:

    python benchmarks/artifact_hashes.py --out runs/hashes > after.txt
    python benchmarks/artifact_hashes.py --compare DIR     # DIR: artifacts of an earlier sweep run

With ``--compare`` the weight files are read from ``DIR/<variant slug>/`` (the ``--out`` of an earlier
``rtn_sweep.py`` / ``ptq_sweep.py`` run) and each variant's line says whether they match.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ptq_sweep  # noqa: E402
import rtn_sweep  # noqa: E402

from dsq.run.pipeline import run  # noqa: E402
from dsq.run.recipe import load_recipe  # noqa: E402

QUICK = ["eval.perplexity=null", "eval.multiple_choice=null", "eval.reload_check=false", "progress=false", "overwrite=true"]


def variants() -> dict[str, tuple[str, list[str]]]:
    """``slug -> (sweep, overrides)`` for every variant of both sweeps, with the sweeps' own settings."""
    out = {f"rtn/{name.replace(' ', '-')}": ("rtn", list(o)) for name, o in rtn_sweep.VARIANTS.items()}
    for name, (overrides, _) in ptq_sweep.VARIANTS.items():
        calibrated = any(f"quantize.method={m}" in overrides for m in ptq_sweep.CALIBRATED)
        extra = ["quantize.calibration.samples=192"] if calibrated else []
        slug = name.replace(" ", "-").replace("+", "").replace("--", "-")  # as ptq_sweep.py names its outputs
        out[f"ptq/{slug}"] = ("ptq", list(overrides) + extra)
    return out


def weight_digest(root: Path) -> str:
    """sha256 over the weight files of an artifact, in name order (name and bytes of each)."""
    h = hashlib.sha256()
    for path in sorted(root.glob("*.safetensors")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/hashes", help="where the artifacts go")
    parser.add_argument("--compare", type=Path, default=None, help="root of earlier sweep artifacts (rtn/, ptq/)")
    parser.add_argument("--only", nargs="*", default=None, help="slugs to run (e.g. ptq/gptq-int4-g128)")
    args = parser.parse_args()
    mismatches = 0
    print("| variant | sha256 of the weight files | earlier run |")
    print("|---|---|---|")
    for slug, (_, overrides) in variants().items():
        if args.only and slug not in args.only:
            continue
        result = run(load_recipe(None, overrides + QUICK + [f"output={args.out}/{slug}"]))
        digest = weight_digest(result.output)
        verdict = "-"
        if args.compare is not None:
            earlier = args.compare / slug
            verdict = "missing" if not earlier.is_dir() else ("same" if weight_digest(earlier) == digest else "DIFFERENT")
            mismatches += verdict == "DIFFERENT"
        print(f"| {slug} | {digest} | {verdict} |", flush=True)
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
