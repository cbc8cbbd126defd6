"""The bundled DeepSeek-V3 through ONNX Runtime: FP32, INT8 and INT4-GPTQ exports against torch.

Each variant is a normal dsq run with an ``export:`` section (FP32: ``dsq export --evaluate`` on the
bundled checkpoint). The export validates ORT against dsq's torch forward of the same model (prefill,
decode, 32 greedy tokens); the ONNX row is then evaluated by the same harness as the torch row, so the
perplexities compare the same artifact in two runtimes.

Run: python benchmarks/onnx_parity.py [--only fp32,int8,w8a8,int4-gptq] [--out runs/onnx_parity]
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "int8": ("int8_channel.yaml", []),
    "w8a8": ("w8a8_smoothquant.yaml", []),
    "int4-gptq": ("gptq_int4_g128.yaml", []),
}


def _row_facts(torch_row: dict, onnx_row: dict) -> dict:
    facts = onnx_row["extra"]["onnx"]
    return {
        "torch_ppl": torch_row["ppl"]["ppl"],
        "ort_ppl": onnx_row["ppl"]["ppl"],
        "ppl_vs_torch_pct": facts["ppl_vs_torch_pct"],
        "max_abs_logit_diff": facts["max_abs_logit_diff"],
        "tolerance": facts["tolerance"],
        "greedy_tokens_equal": facts["greedy_tokens_equal"],
        "matmul_nbits": facts["matmul_nbits"],
        "int8_matmul": facts["int8_matmul"],
        "experts_in_graph": facts["experts_in_graph"],
        "onnx_mib": facts["onnx_bytes"] / 2**20,
        "export_seconds": facts["seconds"],
        "torch_prefill": (torch_row.get("speed") or {}).get("prefill_tokens_per_s"),
        "ort_prefill": (onnx_row.get("speed") or {}).get("prefill_tokens_per_s"),
        "torch_decode": (torch_row.get("speed") or {}).get("decode_tokens_per_s"),
        "ort_decode": (onnx_row.get("speed") or {}).get("decode_tokens_per_s"),
    }


def run_fp32(out: Path) -> dict:
    from dsq.core.checkpoint import bundled_model_path
    from dsq.run.export_command import run_export

    result = run_export(bundled_model_path(), out / "fp32", evaluate=True, speed=True, overwrite=True, progress=False)
    data = json.loads((out / "fp32" / "report.json").read_text())
    return _row_facts(data["original"], data["candidates"][0]) | {"artifact": str(result.result.path)}


def run_recipe(name: str, out: Path) -> dict:
    from dsq.run.pipeline import run
    from dsq.run.recipe import load_recipe

    recipe_file, overrides = VARIANTS[name]
    recipe = load_recipe(ROOT / "recipes" / recipe_file, [
        *overrides, f"output={out / name}", "overwrite=true", "progress=false", "export={}",
        "eval.speed={}", "eval.reload_check=false",
    ])
    result = run(recipe)
    data = json.loads((result.output / "report.json").read_text())
    torch_row, onnx_row = data["candidates"]
    return _row_facts(torch_row, onnx_row) | {"artifact": str(result.output)}


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="fp32,int8,w8a8,int4-gptq")
    parser.add_argument("--out", default="runs/onnx_parity")
    args = parser.parse_args()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    out = Path(args.out)
    results = {}
    for name in args.only.split(","):
        started = time.perf_counter()
        results[name] = run_fp32(out) if name == "fp32" else run_recipe(name, out)
        results[name]["wall_seconds"] = time.perf_counter() - started
        print(f"{name}: done in {results[name]['wall_seconds']:.0f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print("| variant | max abs dlogit (tol) | greedy 32 equal | torch ppl | ORT ppl | ORT vs torch | "
          "MatMulNBits / MatMulInteger | experts in graph | ONNX MiB | prefill tok/s torch / ORT | decode tok/s torch / ORT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['max_abs_logit_diff']:.2e} ({r['tolerance']:g}) | {r['greedy_tokens_equal']} | "
              f"{r['torch_ppl']:.4f} | {r['ort_ppl']:.4f} | {r['ppl_vs_torch_pct']:+.4f} % | "
              f"{r['matmul_nbits']} / {r['int8_matmul']} | {r['experts_in_graph']} | {r['onnx_mib']:.1f} | "
              f"{_fmt(r['torch_prefill'], '.0f')} / {_fmt(r['ort_prefill'], '.0f')} | "
              f"{_fmt(r['torch_decode'], '.1f')} / {_fmt(r['ort_decode'], '.1f')} |")


if __name__ == "__main__":
    main()
