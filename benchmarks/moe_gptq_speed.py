"""GPTQ on MoE experts: one expert at a time (the per-expert loop) against batched solves, same integers.

Builds a DeepSeek-V3-shaped MoE with random weights in memory (default: 64 routed experts, top-6, hidden 512,
4 layers, the first dense), or loads ``--model`` (e.g. the bundled ``dsq/assets/tiny_deepseek_v3``), and runs
dsq's GPTQ with ``expert_chunk`` 1 (every weight solved alone: the per-expert loop) and each batched chunk
given. Prints, per chunk: the time spent in the solves, the whole ``quantize_`` call (statistics included), the
ratios to the loop, and whether every integer, scale and zero point equals the loop's.

    python benchmarks/moe_gptq_speed.py --threads 2 [--chunks 8 64] [--min-max] [--model dsq/assets/tiny_deepseek_v3]
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

import dsq.quantize.methods.gptq as gptq_method
from dsq.core.loading import load_checkpoint
from dsq.eval.memory import avx512_flags, machine_info
from dsq.quantize import GPTQConfig, PerGroup, WeightScheme, quantize_
from dsq.tools.synthetic import deepseek_v3_config


@dataclass
class Timing:
    solve_seconds: float
    total_seconds: float
    state: dict[str, torch.Tensor]


def synthetic_moe(hidden: int, layers: int, experts: int, top_k: int, moe_intermediate: int, seed: int) -> torch.nn.Module:
    fields = deepseek_v3_config(
        hidden_size=hidden, num_layers=layers, num_experts=experts, moe_intermediate_size=moe_intermediate,
        num_experts_per_tok=top_k, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, dtype=torch.float32,
    )
    config = AutoConfig.for_model(**fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def timed_gptq(model: torch.nn.Module, config: GPTQConfig, ids: torch.Tensor) -> Timing:
    """Quantize a copy of ``model``; the solves are timed by wrapping dsq's solve entry point."""
    m = copy.deepcopy(model)
    spent = [0.0]
    real = gptq_method.solve_batched

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = real(*args, **kwargs)
        spent[0] += time.perf_counter() - t0
        return out

    gptq_method.solve_batched = timed
    try:
        t0 = time.perf_counter()
        quantize_(m, config, calibration=ids, progress=False)
        total = time.perf_counter() - t0
    finally:
        gptq_method.solve_batched = real
    return Timing(spent[0], total, {k: v.clone() for k, v in m.state_dict().items()})


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[bool, int]:
    """Whether every tensor is equal, and how many tensors differ."""
    differ = sum(1 for k in a if k not in b or not torch.equal(a[k], b[k]))
    return differ == 0 and a.keys() == b.keys(), differ


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a checkpoint directory (default: the synthetic MoE)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--moe-intermediate", type=int, default=256)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 64], help="expert_chunk values to compare with 1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-max", action="store_true", help="min/max group ranges instead of the range search")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.model:
        model, what = load_checkpoint(args.model, dtype=torch.float32).model, args.model
    else:
        model = synthetic_moe(args.hidden, args.layers, args.experts, args.top_k, args.moe_intermediate, args.seed)
        what = (f"synthetic DeepSeek-V3 MoE: hidden {args.hidden}, {args.layers} layers (first dense), "
                f"{args.experts} experts top-{args.top_k}, expert width {args.moe_intermediate}")
    ids = torch.randint(0, model.config.vocab_size, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    print(f"model: {what}")
    ranges = "min/max ranges" if args.min_max else "range search (dsq defaults)"
    print(f"GPTQ int4 g{args.group} sym, act_order, {ranges}; calibration {args.samples} x {args.seq_len} tokens")
    print(f"CPU: {machine_info()['cpu']}, {torch.get_num_threads()} threads, {' '.join(avx512_flags()) or 'no AVX-512'}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}\n")

    scheme = WeightScheme(4, PerGroup(args.group))
    mse = not args.min_max
    loop = timed_gptq(model, GPTQConfig(scheme, expert_chunk=1, mse_scales=mse), ids)
    print("| expert_chunk | solves (s) | x loop | quantize_ total (s) | x loop | integers equal the loop's |")
    print("|---|---|---|---|---|---|")
    print(f"| 1 (per-expert loop) | {loop.solve_seconds:.2f} | 1.00 | {loop.total_seconds:.2f} | 1.00 | - |")
    for chunk in args.chunks:
        batched = timed_gptq(model, GPTQConfig(scheme, expert_chunk=chunk, mse_scales=mse), ids)
        equal, differ = same_state(loop.state, batched.state)
        print(f"| {chunk} | {batched.solve_seconds:.2f} | {loop.solve_seconds / batched.solve_seconds:.2f} | "
              f"{batched.total_seconds:.2f} | {loop.total_seconds / batched.total_seconds:.2f} | "
              f"{'yes' if equal else f'NO ({differ} tensors differ)'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
