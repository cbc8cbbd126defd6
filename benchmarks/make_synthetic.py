"""Write a synthetic DeepSeek-V3-shaped checkpoint (random weights, real layout), shard by shard.

Sizes not given follow DeepSeek-V3's proportions to --hidden (see dsq.tools.synthetic.deepseek_v3_config).
With --fp8 the decoder layers' Linear weights (attention, dense/shared MLPs, every routed expert) are
float8_e4m3fn with 128x128 float32 block scales, as in the official DeepSeek-V3/R1 checkpoints.

    python benchmarks/make_synthetic.py --out runs/synth-v3 --layers 4 --hidden 2048 --experts 32 \
        --moe-intermediate 512 [--fp8] [--dtype bfloat16] [--shard-mb 1024] [--seed 0]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dsq.tools.synthetic import deepseek_v3_config, write_synthetic_checkpoint
from dsq.core.layout import num_parameters, tensor_specs

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--experts", type=int, required=True, help="routed experts per MoE layer")
    parser.add_argument("--moe-intermediate", type=int, required=True)
    parser.add_argument("--intermediate", type=int, default=None, help="dense MLP width")
    parser.add_argument("--dense-layers", type=int, default=1, help="first_k_dense_replace")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--q-lora-rank", type=int, default=None, help="0: direct q_proj")
    parser.add_argument("--kv-lora-rank", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--fp8", action="store_true", help="FP8 block-scaled Linear weights")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--shard-mb", type=float, default=1024, help="largest shard file, MiB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    config = deepseek_v3_config(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_experts=args.experts,
        moe_intermediate_size=args.moe_intermediate,
        intermediate_size=args.intermediate,
        first_k_dense_replace=args.dense_layers,
        heads=args.heads,
        q_lora_rank=args.q_lora_rank,
        kv_lora_rank=args.kv_lora_rank,
        vocab_size=args.vocab,
        dtype=DTYPES[args.dtype],
    )
    params = num_parameters(tensor_specs(config))
    start = time.perf_counter()
    root = write_synthetic_checkpoint(
        args.out,
        config,
        dtype=DTYPES[args.dtype],
        fp8=args.fp8,
        max_shard_bytes=int(args.shard_mb * 2**20),
        seed=args.seed,
    )
    seconds = time.perf_counter() - start
    shards = sorted(root.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    print(f"wrote {root}: {len(shards)} shard(s), {size / 2**30:.3f} GiB ({size} bytes) of weights on disk")
    print(f"parameters: {params:,} ({params / 1e9:.3f} B); {args.dtype}{' + fp8 Linear weights' if args.fp8 else ''}")
    print(f"time: {seconds:.1f} s ({size / 2**20 / seconds:.0f} MiB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
