"""QAT and LoRA on the bundled tiny DeepSeek-V3: the recipes under recipes/, measured end to end.

Runs each recipe through the pipeline (training included) and prints two Markdown tables:

- QAT: perplexity increase over the FP original of round-to-nearest at the same format (a separate
  run), of QAT's step 0 (RTN with min/max or searched ranges, or the PTQ result) and of the QAT
  model; the share of RTN's gap that QAT recovered, ``(RTN - QAT) / RTN``; top-1 agreement and KL;
  and the training budget (steps, tokens, wall time, peak RSS);
- LoRA: held-out *domain* perplexity of the base, of the adapter model and of the merged model,
  the drop against the base, the trainable-parameter share, and the merged model's drift against
  the adapter model (top-1 agreement, perplexity change).

    python benchmarks/finetune_sweep.py [--out runs/finetune] [--only NAME ...] [--reuse] [key.path=value ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsq.run.pipeline import run
from dsq.run.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
QAT = {
    "qat int4 g128 (from FP)": "qat_int4_g128.yaml",
    "qat int8 channel (from FP)": "qat_int8_channel.yaml",
    "qat int4 g128 (from GPTQ)": "qat_from_gptq_int4_g128.yaml",
}
LORA = {
    "lora (FP base)": "lora_domain.yaml",
    "qlora (bnb-nf4 base)": "qlora_nf4_domain.yaml",
    "qlora (dsq int4 g128 base)": "qlora_int4_domain.yaml",
}


def _budget(training: dict) -> str:
    return (f"{training['steps']} steps, {training['tokens_seen']:,} tokens, {training['seconds']:.0f} s, "
            f"{training['peak_rss_bytes'] / 2**20:.0f} MiB")


def rtn_reference(recipe: str, overrides: list[str], out: str, reuse: bool) -> dict:
    """The same weight format by plain round-to-nearest (the gap QAT is measured against)."""
    w = load_recipe(ROOT / "recipes" / recipe).quantize.weights
    fields = [f"quantize.weights.{k}={v}" for k, v in w.model_dump().items()]
    r = load_recipe(None, [*overrides, "quantize.method=rtn", *fields, f"output={out}", "overwrite=true", "progress=false"])
    return _report(r, reuse)["candidates"][0]


def _report(recipe, reuse: bool) -> dict:
    """Run the recipe (or, with ``reuse``, read the report an earlier run left in its output)."""
    path = Path(recipe.output) / "report.json"
    if not (reuse and path.is_file()):
        path = run(recipe).output / "report.json"
    return json.loads(path.read_text())


def qat_row(name: str, report: dict, rtn: dict) -> str:
    start, qat = report["candidates"]
    s, q = start["deltas"]["ppl_increase_pct"], qat["deltas"]["ppl_increase_pct"]
    r = rtn["deltas"]["ppl_increase_pct"]
    recovered = (r - q) / r if r else float("nan")
    return (f"| {name} | {report['original']['ppl']['ppl']:.3f} | {r:+.2f} | {s:+.2f} | {q:+.2f} | {recovered:.2f} | "
            f"{start['fidelity']['mean_kl']:.5f} → {qat['fidelity']['mean_kl']:.5f} | "
            f"{start['fidelity']['top1_agreement']:.4f} → {qat['fidelity']['top1_agreement']:.4f} | "
            f"{qat['mc']['acc']:.3f} | {_budget(qat['extra']['training'])} |")


def lora_row(name: str, report: dict) -> str:
    rows = {c["name"]: c for c in report["candidates"]}
    base = next((c for n, c in rows.items() if n.endswith("(QLoRA base)")), report["original"])
    adapter = next(c for n, c in rows.items() if n.startswith("lora-") and not n.startswith("lora-merged"))
    merged = next((c for n, c in rows.items() if n.startswith("lora-merged")), None)
    lora = adapter["extra"]["lora"]
    drop = 100 * (adapter["ppl"]["ppl"] / base["ppl"]["ppl"] - 1)
    drift = (merged or {}).get("extra", {}).get("merge", {}).get("drift_vs_adapter")
    drift_txt = f"{drift['top1_agreement']:.4f} / {drift['ppl_increase_pct']:+.2f} %" if drift else "exact (FP)"
    merged_ppl = f"{merged['ppl']['ppl']:.3f}" if merged else "-"
    return (f"| {name} | {report['original']['ppl']['ppl']:.3f} | {base['ppl']['ppl']:.3f} | {adapter['ppl']['ppl']:.3f} | "
            f"{drop:+.1f} | {merged_ppl} | {drift_txt} | {lora['trainable_share'] * 100:.2f} % | "
            f"{adapter['mc']['acc']:.3f} | {_budget(adapter['extra']['training'])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/finetune")
    parser.add_argument("--only", nargs="*", default=None, help="row names to run")
    parser.add_argument("--reuse", action="store_true", help="read reports already in --out instead of rerunning")
    parser.add_argument("overrides", nargs="*", help="recipe overrides applied to every run")
    args = parser.parse_args()
    qat_lines, lora_lines = [], []
    for table, lines in ((QAT, qat_lines), (LORA, lora_lines)):
        for name, recipe in table.items():
            if args.only and name not in args.only:
                continue
            slug = recipe.removesuffix(".yaml")
            r = load_recipe(ROOT / "recipes" / recipe, [*args.overrides, f"output={args.out}/{slug}", "overwrite=true",
                                                        "progress=false"])
            report = _report(r, args.reuse)
            if table is QAT:
                lines.append(qat_row(name, report, rtn_reference(recipe, args.overrides, f"{args.out}/{slug}-rtn", args.reuse)))
            else:
                lines.append(lora_row(name, report))
            print(lines[-1], flush=True)
    if qat_lines:
        print("\n| QAT | FP ppl | RTN Δppl % | step 0 Δppl % | QAT Δppl % | share of RTN's gap recovered | KL step 0 → QAT | top-1 step 0 → QAT | mc acc | training budget |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(qat_lines))
    if lora_lines:
        print("\n| LoRA | FP domain ppl | base domain ppl | adapter domain ppl | Δ vs base % | merged ppl | merged vs adapter: top-1 / Δppl | trainable share | mc acc (stdlib) | training budget |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(lora_lines))


if __name__ == "__main__":
    main()
