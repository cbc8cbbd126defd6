"""Plans for the public DeepSeek configs shipped in ``dsq/assets/public_configs`` (no weights needed).

Prints one compact Markdown table over the models (parameters, weight bytes per format,
peak memory of each path, calibration time), then every model's full plan. Nothing is
downloaded and no tensor data exists: the plans come from config.json alone.

    python benchmarks/plan_public.py                                   # GPTQ INT4 g128, bfloat16
    python benchmarks/plan_public.py --recipe recipes/demo.yaml dtype=bfloat16 --tflops 200
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from dsq.tools.plan import CATEGORIES, Plan, plan_checkpoint
from dsq.run.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "dsq" / "assets" / "public_configs"
MODELS = ("deepseek-r1-distill-qwen-1.5b", "deepseek-v2-lite", "deepseek-v3", "deepseek-v3.2", "deepseek-v4-flash", "deepseek-v4-pro")
DEFAULT_RECIPE = ROOT / "recipes" / "gptq_int4_g128.yaml"
DEFAULT_OVERRIDES = ("dtype=bfloat16",)
GiB = 1 << 30
PEAKS = {
    "in_memory": "peak host RAM, in-memory path",
    "streaming": "peak host RAM, streaming (one layer at a time)",
    "accelerator": "peak accelerator memory, one layer at a time",
}


def gib(n: int) -> str:
    return f"{n / GiB:,.1f}"


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f}" if seconds >= 36 else f"{seconds / 3600:.3f}"


def recipe_settings(plans: dict[str, Plan]) -> str:
    """The recipe line every plan shares, without its source label."""
    return next(iter(plans.values())).recipe.split(": ", 1)[1]


def summary(plans: dict[str, Plan]) -> str:
    """One table, a column per model."""
    first = next(iter(plans.values()))
    rows: list[tuple[str, list[str]]] = [
        ("parameters (B)", [f"{p.parameters.total / 1e9:,.2f}" for p in plans.values()]),
        ("not used by the model, not quantized (B)",
         [f"{p.source.unused.parameters / 1e9:,.2f}" if p.source.unused else "-" for p in plans.values()]),
        ("decoder layers (dense + MoE)",
         [f"{sum(not x.moe for x in p.layers)} + {sum(x.moe for x in p.layers)}" for p in plans.values()]),
        ("source weights (GiB)", [f"{gib(p.source.tensor_bytes)} ({p.source.storage.split(' (')[0]})" for p in plans.values()]),
    ]
    for i, scheme in enumerate(first.schemes):
        rows.append((f"{scheme.label} (GiB)", [gib(p.schemes[i].tensor_bytes) for p in plans.values()]))
    for key, label in PEAKS.items():
        rows.append((f"{label} (GiB)", [gib(getattr(p, key).total) for p in plans.values()]))
    rows.append(("largest layer's method statistics (GiB)",
                 [gib(max(x.statistics_bytes for x in p.layers)) for p in plans.values()]))
    rows.append(("calibration FLOPs", [f"{p.time.total_flops:.2e}" for p in plans.values()]))
    for label, tflops in first.time.throughputs:
        rows.append((f"calibration hours at {tflops:g} TFLOPS ({label})", [hours(p.time.seconds(tflops)) for p in plans.values()]))
    lines = ["| | " + " | ".join(plans) + " |", "|---|" + "---:|" * len(plans)]
    lines += [f"| {name} | " + " | ".join(values) + " |" for name, values in rows]
    return "\n".join(lines)


def categories(plans: dict[str, Plan]) -> str:
    """Parameters by category, a column per model."""
    names = [c for c in CATEGORIES if any(c in dict(p.parameters.by_category) for p in plans.values())]
    lines = ["| parameters (B) | " + " | ".join(plans) + " |", "|---|" + "---:|" * len(plans)]
    for name in names:
        values = [f"{dict(p.parameters.by_category).get(name, 0) / 1e9:,.3f}" for p in plans.values()]
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="recipe YAML (default: the GPTQ INT4 g128 recipe)")
    parser.add_argument("overrides", nargs="*", default=list(DEFAULT_OVERRIDES), metavar="key.path=value",
                        help="recipe overrides (default: dtype=bfloat16)")
    parser.add_argument("--tflops", type=float, default=None, help="throughput for the calibration time")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    plans = {name: plan_checkpoint(CONFIGS / name, recipe, tflops=args.tflops) for name in MODELS}
    shown = args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe
    print(f"# Plans of the public DeepSeek configs\n\n`python benchmarks/plan_public.py` — recipe `{shown}` "
          f"with {' '.join(args.overrides) or 'no overrides'}; {recipe_settings(plans)}\n")
    print(summary(plans))
    print()
    print(categories(plans))
    for plan in plans.values():
        print()
        text = plan.to_markdown().replace(str(ROOT) + "/", "")  # paths relative to the repository
        print(re.sub(r"^(#+) ", r"#\1 ", text, flags=re.M))  # one heading level down


if __name__ == "__main__":
    main()
