"""Calibration in 1 process against N processes (``torchrun``, gloo on CPU): wall time and the artifact.

Writes a synthetic DeepSeek-V3-shaped MoE checkpoint (random weights; default 64 experts top-6, hidden 512,
4 layers) unless ``--model`` is given, then runs the same GPTQ recipe with ``dsq run`` in one process (all
``--threads`` threads) and under ``torchrun --nproc_per_node N`` (``--threads / N`` threads each, so both use
the same cores), and prints the quantization time each run reports, the whole command's wall time, their
ratios, and whether the two artifacts are equal tensor for tensor.

    python benchmarks/split_calibration.py --processes 2 --threads 2 [--samples 64] [--seq-len 128]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from dsq.eval.memory import avx512_flags, machine_info
from dsq.tools.testing import free_port

ROOT = Path(__file__).resolve().parents[1]


def synthetic_checkpoint(out: Path, args: argparse.Namespace) -> Path:
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_synthetic.py"), "--out", str(out), "--layers", str(args.layers),
                        "--hidden", str(args.hidden), "--experts", str(args.experts), "--moe-intermediate", str(args.moe_intermediate),
                        "--dtype", "float32", "--seed", "0"], check=True, capture_output=True)
    return out


def run(cmd: list[str], threads: int) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return seconds, done


def quantize_seconds(artifact: Path) -> float:
    report = json.loads((artifact / "report.json").read_text())
    return float(report["candidates"][0]["extra"]["quantization"]["seconds"])


def same_tensors(a: Path, b: Path) -> tuple[bool, int]:
    ta = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    tb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    differ = sum(1 for k in ta if k not in tb or not torch.equal(ta[k], tb[k]))
    return differ == 0 and ta.keys() == tb.keys(), differ


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint (default: the synthetic MoE, written once)")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "gptq_int4_g128.yaml")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads of the one-process run (split over the processes)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--moe-intermediate", type=int, default=256)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "split_calibration")
    parser.add_argument("--override", action="append", default=[], help="more recipe overrides KEY=VALUE")
    args = parser.parse_args(argv)
    if shutil.which("torchrun") is None:
        raise SystemExit("torchrun is not on PATH")

    model = args.model or synthetic_checkpoint(args.work / "model", args)
    overrides = [f"model={model}", f"quantize.calibration.samples={args.samples}", f"quantize.calibration.seq_len={args.seq_len}",
                 f"quantize.calibration.batch_size={args.batch_size}", "eval.perplexity=null", "eval.multiple_choice=null",
                 "eval.gates={}", "eval.reload_check=false", "eval.fidelity.max_tokens=256", "overwrite=true", *args.override]
    with tempfile.TemporaryDirectory(dir=args.work.parent if args.work.parent.exists() else None) as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        base = ["-m", "dsq", "run", str(args.recipe), *overrides]
        wall_one, _ = run([sys.executable, *base, f"output={one}", "-q"], args.threads)
        per_process = max(1, args.threads // args.processes)
        wall_many, _ = run(["torchrun", "--nproc_per_node", str(args.processes), "--master_port", str(free_port()), *base,
                            f"output={many}", "-q"], per_process)
        q_one, q_many = quantize_seconds(one), quantize_seconds(many)
        equal, differ = same_tensors(one, many)

    print(f"model: {model}; recipe {args.recipe.name}; calibration {args.samples} x {args.seq_len} tokens, batch {args.batch_size}")
    print(f"CPU: {machine_info()['cpu']}, {os.cpu_count()} cores, {' '.join(avx512_flags()) or 'no AVX-512'}; torch {torch.__version__}\n")
    print("| run | threads per process | quantization (s) | x 1 process | whole command (s) | x 1 process |")
    print("|---|---|---|---|---|---|")
    print(f"| 1 process | {args.threads} | {q_one:.1f} | 1.00 | {wall_one:.1f} | 1.00 |")
    print(f"| {args.processes} processes (torchrun, gloo) | {per_process} | {q_many:.1f} | {q_one / q_many:.2f} | {wall_many:.1f} | "
          f"{wall_one / wall_many:.2f} |")
    print(f"\nartifacts equal tensor for tensor: {'yes' if equal else f'NO ({differ} tensors differ)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
