"""Write a copy of a checkpoint with the activation outlier channels of large LLMs (dsq.tools.outliers).

The copy computes the same function in fp32 (the script checks the logits), but a few input
channels of every Linear behind a norm carry 20-100x the median magnitude, as in large trained
models. It prints, per Linear, max/median of the mean |input| before and after, and the largest
logit change.

    python benchmarks/make_outlier_model.py --out runs/outlier_model [--model DIR] [--fraction 0.02] [--overwrite]

The copy holds outliers.json (the spec and the check); only a directory holding one is replaced.
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path

import torch

from dsq.core.atomic import atomic_directory, prepare_output
from dsq.assets import tiny_model_dir
from dsq.core.loading import load_checkpoint
from dsq.tools.outliers import OutlierSpec, add_outlier_channels, input_outlier_ratios
from dsq.quantize.calibration_data import CalibrationDataSpec, load_calibration

MARKER = "outliers.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF checkpoint directory (default: bundled)")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--fraction", type=float, default=OutlierSpec.fraction)
    parser.add_argument("--low", type=float, default=OutlierSpec.low)
    parser.add_argument("--high", type=float, default=OutlierSpec.high)
    parser.add_argument("--seed", type=int, default=OutlierSpec.seed)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier copy at --out")
    args = parser.parse_args()
    spec = OutlierSpec(args.fraction, args.low, args.high, args.seed)
    prepare_output(Path(args.out), args.overwrite, MARKER)  # fail before any work
    loaded = load_checkpoint(args.model or tiny_model_dir())
    model = loaded.model
    ids = load_calibration(CalibrationDataSpec(samples=8, seq_len=256), loaded.tokenizer)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    before = input_outlier_ratios(model, ids)
    norms = add_outlier_channels(model, spec)
    after = input_outlier_ratios(model, ids)
    with torch.no_grad():
        diff = float((model(input_ids=ids).logits - ref).abs().max())
    print(f"{spec}: {len(norms)} norms rescaled; max |logit change| {diff:.2e} (logits up to {float(ref.abs().max()):.1f})")
    print("\n| Linear | max/median mean abs input, before | after |\n|---|---|---|")
    for name in before:
        print(f"| {name} | {before[name]:.1f} | {after[name]:.1f} |")
    print(f"| median over Linears | {statistics.median(before.values()):.1f} | {statistics.median(after.values()):.1f} |")
    with atomic_directory(Path(args.out), args.overwrite, MARKER) as tmp:
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        record = {"spec": asdict(spec), "norms": norms, "max_abs_logit_change": diff, "base": str(args.model or tiny_model_dir())}
        (tmp / MARKER).write_text(json.dumps(record, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
