"""Round-to-nearest sweep on a checkpoint (default: the bundled tiny DeepSeek-V3).

Runs the pipeline once per weight format and prints one Markdown table: perplexity and its
increase, multiple-choice accuracy, top-1 agreement and KL against the original, the
quantized weights' bytes relative to their FP16 bytes, and whole-artifact size ratios.

    python benchmarks/rtn_sweep.py [--model DIR] [--out runs/bench]
"""
from __future__ import annotations

import argparse
import json

from dsq.eval.memory import machine_info
from dsq.run.pipeline import run
from dsq.run.recipe import load_recipe

VARIANTS = {
    "int8 per-channel sym": ["quantize.weights.bits=8", "quantize.weights.granularity=channel"],
    "int8 g128 sym": ["quantize.weights.bits=8", "quantize.weights.group_size=128"],
    "int4 per-channel sym": ["quantize.weights.bits=4", "quantize.weights.granularity=channel"],
    "int4 g128 sym": ["quantize.weights.bits=4", "quantize.weights.group_size=128"],
    "int4 g128 asym": ["quantize.weights.bits=4", "quantize.weights.group_size=128", "quantize.weights.symmetric=false"],
    "int4 g32 sym": ["quantize.weights.bits=4", "quantize.weights.group_size=32"],
    "int4 g32 asym": ["quantize.weights.bits=4", "quantize.weights.group_size=32", "quantize.weights.symmetric=false"],
}


def row(name: str, report: dict) -> str:
    orig = report["original"]
    cand = report["candidates"][0]
    q = cand["extra"]["quantization"]
    reload = cand["extra"]["reload_check"] or {}
    reload_txt = f"{reload['max_abs_logit_diff']:.1e}" if reload.get("loaded") else "n/a (transformers)"
    return (
        f"| {name} | {cand['ppl']['ppl']:.3f} | {cand['deltas']['ppl_increase_pct']:+.2f} | "
        f"{cand['mc']['acc']:.3f} | {cand['mc']['acc_norm']:.3f} | {cand['fidelity']['top1_agreement']:.4f} | "
        f"{cand['fidelity']['mean_kl']:.5f} | {q['quantized_bytes_ratio_vs_fp16']:.3f} | "
        f"{cand['weight_bytes_disk'] / orig['weight_bytes_disk']:.3f} | "
        f"{cand['weight_bytes_disk'] / (orig['weight_bytes_disk'] / 2):.3f} | {q['seconds']:.2f} | {reload_txt} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF checkpoint directory (default: bundled)")
    parser.add_argument("--out", default="runs/bench", help="where the artifacts go")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run")
    args = parser.parse_args()
    base = [f"model={args.model}"] if args.model else []
    lines = []
    original = None
    for name, overrides in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        slug = name.replace(" ", "-")
        recipe = load_recipe(None, base + overrides + [f"output={args.out}/{slug}", "overwrite=true", "progress=false"])
        result = run(recipe)
        report = json.loads((result.output / "report.json").read_text())
        original = report["original"]
        lines.append(row(name, report))
    o = original
    print(f"machine: {json.dumps(machine_info())}")
    print(f"perplexity: context {o['ppl']['context']}, stride {o['ppl']['stride']}, {o['ppl']['tokens']} tokens")
    print(
        f"original (fp32): ppl {o['ppl']['ppl']:.3f}, mc acc {o['mc']['acc']:.3f} / acc_norm {o['mc']['acc_norm']:.3f} "
        f"(n={o['mc']['n']}), weights on disk {o['weight_bytes_disk'] / 2**20:.2f} MiB\n"
    )
    print("| scheme | ppl | Δppl % | mc acc | acc_norm | top-1 agree | mean KL | quantized bytes / FP16 | "
          "artifact weights / FP32 | artifact weights / FP16 | quantize s | reload max Δlogit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
