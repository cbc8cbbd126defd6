"""Quantized KV cache: perplexity and serving memory, original vs int8 (per tensor, per head) vs FP8 e4m3.

    python benchmarks/kv_cache.py [--llama runs/models/tiny_llama] [--samples 128]

Models: the bundled tiny DeepSeek-V3 (MLA: the cache holds the latent and the RoPE key) and a tiny Llama made
locally (default ``runs/models/tiny_llama``, trained by ``python -m dsq.tools.train_llama``; when that directory
is missing, a random-init tiny Llama with the bundled tokenizer, said so in the output). Weights stay fp32:
the rows isolate the KV cache. Each KV row attaches dsq's KV-cache quantization to a fresh copy of the model,
calibrates the scales on the bundled calibration sample (``samples`` x 256 tokens) and runs dsq's evaluation
(sliding-window perplexity on the bundled held-out text, top-1 agreement and KL against the original).
"""
from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch
import transformers

from dsq.core.checkpoint import bundled_model_path
from dsq.core.loading import load_checkpoint
from dsq.eval import Evaluator
from dsq.eval.gates import ppl_increase_pct
from dsq.eval.memory import avx512_flags
from dsq.quantize.calibration_data import load_calibration_with_summary
from dsq.quantize.kv_cache import (
    Fp8E4M3KV, Int8KV, KVCacheScheme, PerHeadKV, PerTensorKV, attach_kv_cache_quantization, calibrate_kv_cache_,
)
from dsq.quantize.sections import CalibrationSection
from dsq.run.recipe import EvalSection
from dsq.run.steps import benchmark_suite
from dsq.tools.testing import make_tiny_checkpoint

SCHEMES = {
    "KV int8 per-tensor": KVCacheScheme(Int8KV(), PerTensorKV()),
    "KV int8 per-head": KVCacheScheme(Int8KV(), PerHeadKV()),
    "KV fp8 e4m3 per-tensor": KVCacheScheme(Fp8E4M3KV(), PerTensorKV()),
}
FLOOR_PCT = 0.1  # KV int8 on the bundled model: perplexity increase at most 0.1 %
GiB = 1 << 30


def _llama(path: Path | None, scratch: Path) -> tuple[Path, str]:
    if path is not None and (path / "config.json").is_file():
        return path, f"{path} (trained locally by dsq.tools.train_llama)"
    made = make_tiny_checkpoint("llama", scratch / "tiny_llama", vocab_size=2048)
    return made, f"random-init tiny Llama ({made}; {path} not found: train one with python -m dsq.tools.train_llama)"


def _rows(checkpoint: Path, samples: int) -> list:
    loaded = load_checkpoint(checkpoint)
    suite = benchmark_suite(EvalSection(multiple_choice=None))  # perplexity (bundled held-out text) and fidelity
    evaluator = Evaluator(suite, loaded.tokenizer, progress=False)
    spec = CalibrationSection(samples=samples).spec()  # the bundled calibration sample
    ids, _ = load_calibration_with_summary(spec, loaded.tokenizer)
    rows = [evaluator.evaluate("original (fp32 cache)", loaded.model, reference=True)]
    for name, scheme in SCHEMES.items():
        model = load_checkpoint(checkpoint).model
        attach_kv_cache_quantization(model, scheme)
        calibrate_kv_cache_(model, ids, batch_size=8)
        rows.append(evaluator.evaluate(name, model))
        del model
    return rows


def _print(title: str, rows: list) -> None:
    original = rows[0]
    print(f"\n### {title}\n")
    m = original.serving_memory
    print(f"cache per token: {m.layout}; weights in memory {m.weight_bytes / (1 << 20):.1f} MiB\n")
    print("| KV cache | ppl | Δppl % | top-1 vs original | mean KL | KV bytes/token | total @4k | total @32k | total @128k |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        s = row.serving_memory
        delta = "-" if row is original else f"{ppl_increase_pct(original, row):+.3f}"
        top1 = "-" if row.fidelity is None else f"{row.fidelity.top1_agreement:.4f}"
        kl = "-" if row.fidelity is None else f"{row.fidelity.mean_kl:.2e}"
        totals = " | ".join(f"{c.total_bytes / GiB:.3f} GiB" for c in s.contexts)
        print(f"| {row.name}: {s.kv_cache} | {row.ppl.ppl:.4f} | {delta} | {top1} | {kl} | "
              f"{s.kv_bytes_per_token:,} | {totals} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama", type=Path, default=Path("runs/models/tiny_llama"), help="tiny Llama directory")
    parser.add_argument("--samples", type=int, default=128, help="calibration sequences (256 tokens each)")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; AVX-512 flags: {' '.join(avx512_flags()) or 'none'}")
    with tempfile.TemporaryDirectory() as scratch:
        llama, llama_what = _llama(args.llama, Path(scratch))
        bundled = _rows(bundled_model_path(), args.samples)
        _print(f"bundled tiny DeepSeek-V3 ({bundled_model_path().name}, fp32 weights)", bundled)
        _print(f"tiny Llama: {llama_what}, fp32 weights", _rows(llama, args.samples))
    original = bundled[0]
    for row in bundled[1:]:
        if "int8" in row.name:
            pct = ppl_increase_pct(original, row)
            verdict = "meets" if pct <= FLOOR_PCT else "MISSES"
            print(f"\nbundled model, {row.name}: perplexity {pct:+.3f} % {verdict} the floor of +{FLOOR_PCT} %")


if __name__ == "__main__":
    main()
