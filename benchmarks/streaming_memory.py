"""Peak RSS of streaming quantization on synthetic DeepSeek-V3-shaped checkpoints of depth L and 2L.

Writes two sharded BF16 (or FP8) checkpoints that differ only in depth, quantizes each with the
streaming runner in a fresh process, and prints the process's peak resident set size (``VmHWM``:
everything, imports included) against the checkpoint's size on disk.

    python benchmarks/streaming_memory.py --root /tmp/dsq-stream --layers 20

Floors checked: peak RSS at 2L <= 1.1x that at L, and <= 25 % of the checkpoint's size.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _dir_bytes(root: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in root.glob(pattern))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(args: argparse.Namespace) -> None:
    """Quantize ``args.src`` into ``args.out`` by streaming; print one JSON line of measurements."""
    import torch

    from dsq.quantize import GPTQConfig, PerGroup, RTNConfig, WeightScheme
    from dsq.quantize.streaming import quantize_streaming

    torch.set_num_threads(args.threads)
    baseline = _status_kib("VmRSS") * 1024
    scheme = WeightScheme(args.bits, PerGroup(args.group_size))
    calibration = None
    if args.method == "gptq":
        config = GPTQConfig(scheme, batch_size=4)
        calibration = torch.randint(3, 2048, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    else:
        config = RTNConfig(scheme)
    out = Path(args.out)
    out.mkdir(parents=True)
    started = time.perf_counter()
    result = quantize_streaming(
        Path(args.src), out, config, calibration=calibration, dtype=getattr(torch, args.dtype),
        max_shard_bytes=args.shard_mb << 20, progress=False,
    )
    print(json.dumps({
        "peak_rss": _status_kib("VmHWM") * 1024,
        "baseline_rss": baseline,
        "seconds": time.perf_counter() - started,
        "seconds_reading": result.seconds_reading,
        "seconds_writing": result.seconds_writing,
        "quantized_params": result.report.quantized_params,
        "out_bytes": _dir_bytes(out),
        "files": len(result.files),
    }))


def _checkpoint(args: argparse.Namespace, layers: int) -> Path:
    from dsq.tools.synthetic import deepseek_v3_config, write_synthetic_checkpoint

    root = Path(args.root) / f"v3-{layers}L{'-fp8' if args.fp8 else ''}"
    if (root / "config.json").exists():
        return root
    config = deepseek_v3_config(
        hidden_size=args.hidden, num_layers=layers, num_experts=args.experts, moe_intermediate_size=args.moe_intermediate,
        num_experts_per_tok=4,
    )
    started = time.perf_counter()
    write_synthetic_checkpoint(root, config, fp8=args.fp8, max_shard_bytes=1 << 30, seed=0)
    print(f"wrote {root} ({_dir_bytes(root) / 2**30:.2f} GiB) in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return root


def _measure(args: argparse.Namespace, src: Path) -> dict:
    out = Path(args.root) / f"out-{src.name}-{args.method}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [
        sys.executable, __file__, "--child", "--src", str(src), "--out", str(out), "--method", args.method,
        "--bits", str(args.bits), "--group-size", str(args.group_size), "--dtype", args.dtype, "--shard-mb", str(args.shard_mb),
        "--threads", str(args.threads), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
    ]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["checkpoint_bytes"] = _dir_bytes(src)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/dsq-stream")
    parser.add_argument("--layers", type=int, default=20, help="L; the second checkpoint has 2L layers")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--moe-intermediate", type=int, default=512)
    parser.add_argument("--fp8", action="store_true", help="FP8 block-scaled checkpoints, as DeepSeek-V3/R1 ship")
    parser.add_argument("--method", choices=["rtn", "gptq"], default="rtn")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shard-mb", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    for layers in (args.layers, 2 * args.layers):
        src = _checkpoint(args, layers)
        rows.append((layers, _measure(args, src)))
        if not args.keep:
            subprocess.run(["rm", "-rf", str(src)], check=True)
    print(f"streaming {args.method} int{args.bits} g{args.group_size}, {args.dtype} working copy, "
          f"{'FP8' if args.fp8 else 'BF16'} checkpoint, hidden {args.hidden}, {args.experts} experts x {args.moe_intermediate}\n")
    print("| layers | checkpoint GiB | peak RSS MiB | peak / checkpoint | import baseline MiB | seconds (read / write) | artifact GiB |")
    print("|---|---|---|---|---|---|---|")
    for layers, r in rows:
        print(f"| {layers} | {r['checkpoint_bytes'] / 2**30:.2f} | {r['peak_rss'] / 2**20:.0f} | "
              f"{100 * r['peak_rss'] / r['checkpoint_bytes']:.1f} % | {r['baseline_rss'] / 2**20:.0f} | "
              f"{r['seconds']:.0f} ({r['seconds_reading']:.0f} / {r['seconds_writing']:.0f}) | {r['out_bytes'] / 2**30:.2f} |")
    (l1, a), (l2, b) = rows
    ratio = b["peak_rss"] / a["peak_rss"]
    share = max(r["peak_rss"] / r["checkpoint_bytes"] for _, r in rows)
    print(f"\npeak RSS {l2}L / {l1}L = {ratio:.3f} (floor <= 1.1): {'PASS' if ratio <= 1.1 else 'FAIL'}")
    print(f"largest peak RSS / checkpoint = {100 * share:.1f} % (floor <= 25 %): {'PASS' if share <= 0.25 else 'FAIL'}")
    small = min(r["checkpoint_bytes"] for _, r in rows)
    print(f"smallest checkpoint {small / 2**30:.2f} GiB (floor >= 2 GB): {'PASS' if small >= 2e9 else 'FAIL'}")


if __name__ == "__main__":
    main()
