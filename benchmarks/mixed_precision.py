"""Mixed precision on the bundled model: the smallest verified artifact that passes a gate all-int4 fails.

Runs ``dsq search`` on ``recipes/search_demo.yaml`` (the bundled tiny DeepSeek-V3; candidates int4 g128,
int8 per channel, keep; gates: perplexity increase <= 0.3 % and top-1 agreement >= 0.95) and prints the
table of every verified point, the sensitivity measurement's cost and the floor checks:

- all-int4 g128 fails the gate and all-int8 passes it;
- the chosen artifact passed the gate in its own verified run and is strictly smaller than all-int8.

    python benchmarks/mixed_precision.py [--recipe recipes/search_demo.yaml] [--output runs/search-demo] [key=value ...]
"""
from __future__ import annotations

import argparse
import sys
import time

from dsq.eval.memory import avx512_flags, machine_info
from dsq.run.recipe import load_recipe
from dsq.run.search import run_search, search_markdown


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/search_demo.yaml")
    p.add_argument("--output", default="runs/search-demo")
    p.add_argument("overrides", nargs="*", help="recipe overrides (key.path=value)")
    args = p.parse_args(argv)
    machine = machine_info()
    print(f"machine: {machine.get('cpu')}; avx512 flags: {' '.join(avx512_flags()) or 'none'}")
    recipe = load_recipe(args.recipe, [f"output={args.output}", "overwrite=true", "progress=false", *args.overrides])
    started = time.perf_counter()
    result = run_search(recipe)
    print(search_markdown(result))
    print(f"search wall time: {time.perf_counter() - started:.0f} s")
    points = {pt.name: pt for pt in result.points}
    checks = []
    int4, int8 = points.get(f"all {recipe.search.candidates[0]}"), points.get("all int8-ch")
    if int4 is not None and int8 is not None:
        checks.append(("all-int4 fails the gate and all-int8 passes", not int4.passed and int8.passed))
    if result.chosen is not None and int8 is not None:
        checks.append((f"chosen ({result.chosen.weight_bytes / 2**20:.3f} MiB) passes and is smaller than all-int8 "
                       f"({int8.weight_bytes / 2**20:.3f} MiB)", result.chosen.passed and result.chosen.weight_bytes < int8.weight_bytes))
    for text, ok in checks:
        print(f"- {text}: {'PASS' if ok else 'FAIL'}")
    return 0 if checks and all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
