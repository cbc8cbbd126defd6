"""Calibrated post-training quantization against round-to-nearest (default: the bundled tiny DeepSeek-V3).

Runs the pipeline once per method and prints one Markdown table: perplexity and its increase,
the share of RTN's increase that remains (same weight format), multiple-choice accuracy,
top-1 agreement and KL against the original, quantized bytes vs FP16, calibration wall time
and peak RSS of the quantization step, and the transformers reload result.

    python benchmarks/ptq_sweep.py [--model DIR] [--out runs/ptq] [--samples 192] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json

from dsq.eval.memory import machine_info
from dsq.run.pipeline import run
from dsq.run.recipe import load_recipe

G128 = ["quantize.weights.bits=4", "quantize.weights.group_size=128"]
G32 = ["quantize.weights.bits=4", "quantize.weights.group_size=32"]
VARIANTS = {
    "rtn int8 channel": (["quantize.method=rtn", "quantize.weights.bits=8", "quantize.weights.granularity=channel"], None),
    "rtn int4 g128": (["quantize.method=rtn", *G128], None),
    "gptq int4 g128": (["quantize.method=gptq", *G128], "rtn int4 g128"),
    "gptq int4 g128 damp 0.001": (["quantize.method=gptq", *G128, "quantize.gptq.damp=0.001"], "rtn int4 g128"),
    "gptq int4 g128 no act-order": (["quantize.method=gptq", *G128, "quantize.gptq.act_order=false"], "rtn int4 g128"),
    "gptq int4 g128 min/max scales": (["quantize.method=gptq", *G128, "quantize.gptq.mse_scales=false"], "rtn int4 g128"),
    "awq int4 g128": (["quantize.method=awq", *G128], "rtn int4 g128"),
    "awq int4 g128 min/max scales": (["quantize.method=awq", *G128, "quantize.awq.mse_scales=false"], "rtn int4 g128"),
    "awq int4 g128 clip": (["quantize.method=awq", *G128, "quantize.awq.clip=true"], "rtn int4 g128"),
    "rtn int4 g32": (["quantize.method=rtn", *G32], None),
    "gptq int4 g32": (["quantize.method=gptq", *G32], "rtn int4 g32"),
    "awq int4 g32": (["quantize.method=awq", *G32], "rtn int4 g32"),
    "w8a8 dynamic": (["quantize.method=w8a8", "quantize.w8a8.smoothquant_alpha=null"], None),
    "w8a8 dynamic + smoothquant 0.5": (["quantize.method=w8a8"], "w8a8 dynamic"),
    "w8a8 static": (["quantize.method=w8a8", "quantize.w8a8.activations=static", "quantize.w8a8.smoothquant_alpha=null"], None),
    "w8a8 static + smoothquant 0.5": (["quantize.method=w8a8", "quantize.w8a8.activations=static"], "w8a8 static"),
    "bnb-nf4": (["quantize.method=bnb-nf4"], None),
    "bnb-fp4": (["quantize.method=bnb-fp4"], None),
    "bnb-int8": (["quantize.method=bnb-int8"], None),
}
CALIBRATED = ("gptq", "awq", "w8a8")


def row(name: str, report: dict, baseline: dict | None) -> str:
    cand = report["candidates"][0]
    q = cand["extra"]["quantization"]
    reload = cand["extra"]["reload_check"] or {}
    reload_txt = f"{reload['max_abs_logit_diff']:.1e}" if reload.get("loaded") else "not loadable"
    inc = cand["deltas"]["ppl_increase_pct"]
    share = f"{inc / baseline['deltas']['ppl_increase_pct']:.2f}" if baseline else "-"
    rss = q.get("peak_rss_bytes")
    return (
        f"| {name} | {cand['ppl']['ppl']:.3f} | {inc:+.2f} | {share} | {cand['mc']['acc']:.3f} | "
        f"{cand['fidelity']['top1_agreement']:.4f} | {cand['fidelity']['mean_kl']:.5f} | "
        f"{q['quantized_bytes_ratio_vs_fp16']:.3f} | {q['seconds']:.1f} | "
        f"{rss / 2**20 if rss else float('nan'):.0f} | {reload_txt} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF checkpoint directory (default: bundled)")
    parser.add_argument("--out", default="runs/ptq", help="where the artifacts go")
    parser.add_argument("--samples", type=int, default=192, help="calibration sequences (x 256 tokens)")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run")
    args = parser.parse_args()
    base = [f"model={args.model}"] if args.model else []
    reports: dict[str, dict] = {}
    lines = []
    for name, (overrides, versus) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        extra = [f"quantize.calibration.samples={args.samples}"] if any(f"method={m}" in overrides[0] for m in CALIBRATED) else []
        slug = name.replace(" ", "-").replace("+", "").replace("--", "-")
        recipe = load_recipe(None, base + overrides + extra + [f"output={args.out}/{slug}", "overwrite=true", "progress=false"])
        result = run(recipe)
        reports[name] = json.loads((result.output / "report.json").read_text())
        baseline = reports.get(versus)["candidates"][0] if versus in reports else None
        lines.append(row(name, reports[name], baseline))
        print(lines[-1], flush=True)
    o = next(iter(reports.values()))["original"]
    print(f"\nmachine: {json.dumps(machine_info())}")
    print(f"perplexity: context {o['ppl']['context']}, stride {o['ppl']['stride']}, {o['ppl']['tokens']} tokens; "
          f"calibration: {args.samples} x 256 tokens from the bundled calibration split")
    print(f"original (fp32): ppl {o['ppl']['ppl']:.3f}, mc acc {o['mc']['acc']:.3f} (n={o['mc']['n']})\n")
    print("| method | ppl | Δppl % | share of baseline's Δ | mc acc | top-1 agree | mean KL | quantized bytes / FP16 | "
          "quantize s | quantize peak RSS MiB | transformers reload max Δlogit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
