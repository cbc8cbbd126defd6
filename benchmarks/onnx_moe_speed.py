"""ONNX Runtime CPU speed of dsq's MoE exports: sparse routed experts (each token runs its top-k) against
the dense form (every expert on every token) and against ONNX Runtime's fused contrib ops (one
``com.microsoft::MoE`` / ``QMoE`` node per MoE layer, ``ExportConfig(moe_op=True)``, the export default),
FP32 and INT4, on one synthetic DeepSeek-V3-shaped model.

Floor checked: with 64 routed experts and top-6 routing, the export's default top-k graph (fused, where ORT's
op carries the layer) decodes at least 4x as many tokens/s as the dense graph (FP32 and INT4 each; whole model
and MoE block alone, see below); the sparse subgraph form is checked and printed beside it; prefill 1 x 128
tokens/s is reported too. Exit 1 when the default form misses the floor.

A random-init DeepSeek-V3 checkpoint (``dsq.tools.testing.make_tiny_checkpoint``, seeded; default
hidden 512, 4 layers of which the first is a dense MLP and 3 are MoE with 64 routed experts of
intermediate 256, top-6, one shared expert, MLA attention) is written locally and loaded with dsq.
INT4 is dsq's RTN, groups of 128, symmetric (``quantize_``: every decoder Linear and every routed
expert; the router and lm_head stay fp32). Each model is exported three times with ``export_onnx``:
sparse (``ExportConfig(moe_op=False)``), dense (``dense_experts=True``) and fused (``moe_op=True``: ``MoE``
for fp32, ``QMoE`` int4 block 128 for INT4); every export runs dsq's full validation against
torch (prefill shapes, cached decode, 32 greedy tokens) and fails on a mismatch. The sparse and fused
graphs are also compared with the dense graph on one 1 x 128 prompt (max |delta logit|).

Timing reuses ``benchmarks/onnx_speed.py``'s interleaved rounds (each round times every graph once,
order rotated, one ORT session alive at a time; prefill 1 x prompt, then greedy decode through
``OrtCausalLM``'s KV cache); the median over rounds is reported, (min-max) in brackets.

The whole-model ratio also carries what both graphs share (MLA attention, the dense first layer, shared
experts, lm_head). Both graphs attend in the cached latent space (``kv_b_proj`` absorbed, the export
default); a third graph per dtype, sparse with ``ExportConfig(absorb_mla=False)``, re-expands the cache
through ``kv_b_proj`` at every step (its decode cost grows with the context) and shows what absorption
is worth. Every graph is opset 23 (one ``Attention`` node per layer over the latent head), except a fourth per
dtype, ``-fused-op21``: the default graph at opset 21 (scores, softmax and weighted sum as elementary ops).
The MoE block alone is measured too: the
first MoE layer's ``mlp`` (router, routed experts, shared expert) of the same model, in the three forms,
exported on its own (``hidden [1, T, H] -> [1, T, H]``) and timed at T = 1 (one decode token) and
T = prompt (median of many runs per round, interleaved rounds, median over rounds).

    python benchmarks/onnx_moe_speed.py [--threads 2] [--repeats 5] [--keep DIR] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_speed import cpu_info, fmt_bytes, quiet, timed_rounds, versions

from dsq.eval.memory import avx512_flags

FLOOR_DECODE = 4.0  # sparse decode tokens/s >= 4x the dense graph's


def build_model(args, workdir: Path):
    """The synthetic DeepSeek-V3 MoE checkpoint (random weights, seed ``args.seed``), loaded by dsq."""
    from dsq.core.loading import load_checkpoint
    from dsq.tools.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(
        "deepseek_v3", workdir / "checkpoint", seed=args.seed, vocab_size=args.vocab, hidden_size=args.hidden,
        intermediate_size=args.intermediate, num_hidden_layers=args.layers, first_k_dense_replace=args.dense_layers,
        n_routed_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_intermediate,
        n_shared_experts=1, num_attention_heads=args.heads, num_key_value_heads=args.heads, q_lora_rank=args.q_lora_rank,
        kv_lora_rank=args.kv_lora_rank, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
        n_group=1, topk_group=1, max_position_embeddings=512,
    )
    loaded = load_checkpoint(ckpt)
    return loaded.model.eval(), loaded.tokenizer


def int4_copy(model: torch.nn.Module) -> torch.nn.Module:
    """dsq RTN INT4, groups of 128, symmetric: decoder Linears and the fused routed experts."""
    import copy

    from dsq.quantize import PerGroup, RTNConfig, TargetSpec, WeightScheme, quantize_

    q = copy.deepcopy(model)
    report = quantize_(q, RTNConfig(scheme=WeightScheme(bits=4, granularity=PerGroup(128), symmetric=True), targets=TargetSpec()),
                       progress=False)
    print(f"int4: {len(report.quantized)} modules quantized (experts included)", flush=True)
    return q.eval()


FORMS = {"sparse": (False, False), "dense": (True, False), "fused": (False, True)}  # form -> (dense_experts, moe_op)


def export(model, tokenizer, out: Path, form: str, absorb: bool, threads: int, opset: int) -> dict:
    from dsq.export import ExportConfig, export_onnx

    dense, moe_op = FORMS[form]
    config = ExportConfig(dense_experts=dense, absorb_mla=absorb, threads=threads, moe_op=moe_op, opset=opset)
    res = export_onnx(model, tokenizer, out, config, overwrite=True)
    v = res.validation
    return {"path": out, "passed": v.passed, "max_abs_diff": v.max_abs_diff, "greedy_equal": v.greedy_equal,
            "seconds": res.seconds, "onnx_bytes": res.onnx_bytes, "nodes": sum(res.ops.values()),
            "form": res.plan.expert_form, "mla": "absorbed" if absorb else "expanded"}


def reuse(out: Path) -> dict | None:
    """An export an earlier run left in ``--keep DIR`` (its manifest's figures), or None."""
    manifest = out / "export_manifest.json"
    if not manifest.is_file():
        return None
    m = json.loads(manifest.read_text())
    v = m["validation"]
    forms = {r["form"] for r in m["quantized_modules"]["routed_experts"].values()}
    return {"path": out, "passed": v["passed"], "max_abs_diff": v["max_abs_logit_diff"], "greedy_equal": v["greedy_tokens_equal"],
            "seconds": float("nan"), "nodes": sum(m["ops"].values()), "form": forms.pop(),
            "mla": "absorbed" if any(v.startswith("absorbed") for v in m["quantized_modules"]["mla_attention"].values()) else "expanded",
            "onnx_bytes": sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("model.onnx")), "reused": True}


def graph_gap(sparse: Path, dense: Path, vocab: int, prompt_len: int, threads: int) -> float:
    """Max |logit_sparse - logit_dense| of the two ORT graphs on one random 1 x ``prompt_len`` prompt."""
    from dsq.export import OrtCausalLM

    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    a = OrtCausalLM(sparse, threads=threads)(input_ids=ids, attention_mask=mask).logits
    b = OrtCausalLM(dense, threads=threads)(input_ids=ids, attention_mask=mask).logits
    return float((a - b).abs().max())


class _Block(torch.nn.Module):
    """One decoder layer's ``mlp`` as a graph of its own: ``hidden [1, T, H] -> [1, T, H]``."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden)


def export_moe_block(model, out: Path, form: str) -> Path:
    """The first MoE layer's ``mlp`` of ``model`` (experts in the asked form) as ``out`` (ONNX)."""
    import copy
    import warnings

    from dsq.export.modules import prepare_for_export, translation_table

    mlp = copy.deepcopy(model.model.layers[model.config.first_k_dense_replace].mlp).float().eval()
    dense, moe_op = FORMS[form]
    plan = prepare_for_export(mlp, dense_experts=dense, moe_op=moe_op)
    if moe_op and not plan.fused:
        raise SystemExit(f"the fused form was refused: {plan.moe_op_refused}")
    example = torch.randn(1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_Block(mlp).eval(), (example,), None, dynamo=True, opset_version=21,
                                    input_names=["hidden"], output_names=["out"],
                                    dynamic_shapes=({1: torch.export.Dim("sequence")},),
                                    custom_translation_table=translation_table(), verbose=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out), external_data=True)
    return out


def time_moe_blocks(paths: dict[str, Path], hidden: int, prompt_len: int, threads: int, rounds: int) -> dict[str, dict]:
    """Median seconds of one run of each block graph at T = 1 and T = ``prompt_len``; interleaved rounds,
    each round times every graph (200 runs at T = 1, 10 at T = prompt), the median over rounds kept."""
    import statistics

    import numpy as np
    import onnxruntime as ort

    def session(path: Path):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    feeds = {t: {"hidden": rng.standard_normal((1, t, hidden), dtype=np.float32)} for t in (1, prompt_len)}
    sessions = {name: session(p) for name, p in paths.items()}
    runs: dict[str, dict[int, list[float]]] = {name: {1: [], prompt_len: []} for name in paths}
    for _ in range(rounds):
        for name, sess in sessions.items():
            for t, n in ((1, 200), (prompt_len, 10)):
                sess.run(None, feeds[t])
                times = []
                for _ in range(n):
                    started = time.perf_counter()
                    sess.run(None, feeds[t])
                    times.append(time.perf_counter() - started)
                runs[name][t].append(statistics.median(times))
    outputs = {name: sess.run(None, feeds[prompt_len])[0] for name, sess in sessions.items()}
    gaps = {name: float(np.abs(out - outputs[f"{name.split('-')[0]}-dense"]).max())
            for name, out in outputs.items() if not name.endswith("dense")}
    return {name: {"decode_s": statistics.median(r[1]), "prefill_s": statistics.median(r[prompt_len]),
                   "vs_dense": gaps.get(name)} for name, r in runs.items()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads and torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median reported)")
    p.add_argument("--keep", type=Path, default=None,
                   help="keep the checkpoint and exports in this directory (exports found there are reused: timing only)")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    g = p.add_argument_group("model shape (DeepSeek-V3, MLA + MoE)")
    g.add_argument("--hidden", type=int, default=512)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--dense-layers", type=int, default=1, help="first_k_dense_replace: leading layers with a dense MLP")
    g.add_argument("--intermediate", type=int, default=1024, help="dense MLP intermediate size")
    g.add_argument("--experts", type=int, default=64)
    g.add_argument("--top-k", type=int, default=6)
    g.add_argument("--moe-intermediate", type=int, default=256)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--q-lora-rank", type=int, default=256)
    g.add_argument("--kv-lora-rank", type=int, default=128)
    g.add_argument("--vocab", type=int, default=4096)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    machine, vers = cpu_info(), versions()
    print(f"machine: {machine['cpu']}, {machine['logical_cores']} logical cores ({machine['usable_cores']} usable)")
    print(f"avx512 flags (grep -o 'avx512[a-z_0-9]*' /proc/cpuinfo | sort -u): {' '.join(avx512_flags()) or 'none'}")
    print(f"int8-relevant CPU flags present: {' '.join(machine['flags_present']) or '-'}; absent: {' '.join(machine['flags_absent']) or '-'}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"load average (1/5/15 min) at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (shared machine: other load adds noise)")
    print(f"threads: {args.threads}; repeats {args.repeats}")
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="onnx_moe_speed_", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, workdir, {"machine": machine, "versions": vers, "args": {k: str(v) for k, v in vars(args).items()}})
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(args, workdir: Path, results: dict) -> int:
    from dsq.eval.speed import SpeedConfig
    from dsq.export import OrtCausalLM

    model, tokenizer = build_model(args, workdir)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    print(f"\nmodel: DeepSeek-V3 shape, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers ({moe_layers} MoE), "
          f"{cfg.n_routed_experts} routed experts top-{cfg.num_experts_per_tok} (moe intermediate {cfg.moe_intermediate_size}) "
          f"+ {cfg.n_shared_experts} shared, MLA q_lora {cfg.q_lora_rank} kv_lora {cfg.kv_lora_rank}, {cfg.num_attention_heads} heads, "
          f"vocab {cfg.vocab_size}; {params / 1e6:.1f}M parameters, {experts / 1e6:.1f}M in routed experts")
    results["model"] = {"params": params, "routed_expert_params": experts, "moe_layers": moe_layers}

    exports: dict[str, dict] = {}
    blocks: dict[str, Path] = {}
    for dtype in ("fp32", "int4"):
        m = model if dtype == "fp32" else int4_copy(model)
        for form, absorb, opset in (("sparse", True, 23), ("dense", True, 23), ("fused", True, 23), ("sparse", False, 23),
                                    ("fused", True, 21)):
            name = f"{dtype}-{form}" + ("" if absorb else "-expanded_mla") + ("" if opset == 23 else f"-op{opset}")
            if absorb and opset == 23:
                block = workdir / "blocks" / name / "model.onnx"
                blocks[name] = block if block.is_file() else export_moe_block(m, block, form)
            t0 = time.perf_counter()
            exports[name] = reuse(workdir / name) or export(m, tokenizer, workdir / name, form, absorb, args.threads, opset)
            e = exports[name]
            how = f"reused from {workdir / name}" if e.get("reused") else f"exported and validated in {time.perf_counter() - t0:.0f} s"
            print(f"[{name}] {how}: max|dlogit| vs torch {e['max_abs_diff']:.2e}, "
                  f"greedy equal {e['greedy_equal']}, {e['nodes']} nodes, {fmt_bytes(e['onnx_bytes'])}", flush=True)
        for form in ("sparse", "fused"):
            gap = graph_gap(workdir / f"{dtype}-{form}", workdir / f"{dtype}-dense", cfg.vocab_size, args.prompt_len, args.threads)
            exports[f"{dtype}-{form}"]["vs_dense"] = gap
            print(f"[{dtype}] {form} vs dense graph, 1 x {args.prompt_len} prompt: max |delta logit| {gap:.2e}", flush=True)
        del m

    print(f"\ntiming the MoE block graphs: {args.repeats} interleaved rounds", flush=True)
    block_speed = time_moe_blocks(blocks, cfg.hidden_size, args.prompt_len, args.threads, args.repeats)
    speed_cfg = SpeedConfig(batch=1, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats)
    makers = {name: (lambda p=e["path"]: OrtCausalLM(p, threads=args.threads)) for name, e in exports.items()}
    speeds = timed_rounds(makers, speed_cfg, cfg.vocab_size)

    print(f"\n### ORT CPU, synthetic DeepSeek-V3 MoE ({cfg.n_routed_experts} experts, top-{cfg.num_experts_per_tok}, hidden "
          f"{cfg.hidden_size}, {moe_layers} MoE layers), batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{args.threads} threads (median of {args.repeats} interleaved rounds, (min-max))\n")
    print("| graph | routed experts | MLA | prefill tok/s | x dense | decode tok/s | x dense | x sparse | nodes | ONNX files | "
          "max \\|Δlogit\\| vs torch | vs dense \\|Δlogit\\| | greedy = torch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    checks = []
    for name, e in exports.items():
        s = speeds[name]
        dtype = name.split("-")[0]
        base = speeds[f"{dtype}-dense"]
        pre_x = s["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        dec_x = s["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        dec_sparse = s["decode_tokens_per_s"] / speeds[f"{dtype}-sparse"]["decode_tokens_per_s"]
        e.update(speed=s, prefill_x_dense=pre_x, decode_x_dense=dec_x, decode_x_sparse=dec_sparse)
        gap = f"{e['vs_dense']:.2e}" if "vs_dense" in e else "-"
        print(f"| {name} | {e['form']} | {e['mla']} | {s['prefill_tokens_per_s']:.1f} ({s['prefill_min']:.0f}-{s['prefill_max']:.0f}) | {pre_x:.2f} | "
              f"{s['decode_tokens_per_s']:.1f} ({s['decode_min']:.1f}-{s['decode_max']:.1f}) | {dec_x:.2f} | {dec_sparse:.2f} | {e['nodes']} | "
              f"{fmt_bytes(e['onnx_bytes'])} | {e['max_abs_diff']:.2e} | {gap} | {e['greedy_equal']} |")
        if e["form"] != "dense" and e["mla"] == "absorbed":  # both top-k forms: fused (the default) and sparse
            checks.append((f"{name} ({e['form']}): whole model decode >= {FLOOR_DECODE:g}x dense", dec_x, dec_x >= FLOOR_DECODE))
    print(f"\n### MoE block alone (layer {cfg.first_k_dense_replace} mlp: router + {cfg.n_routed_experts} routed experts + shared "
          f"expert), ORT, {args.threads} threads, median over {args.repeats} interleaved rounds\n")
    print(f"| graph | 1 token (decode) ms | speed x dense | speed x sparse | {args.prompt_len} tokens (prefill) ms | "
          "speed x dense | speed x sparse | vs dense max \\|Δ\\| |")
    print("|---|---|---|---|---|---|---|---|")
    for name, b in block_speed.items():
        base = block_speed[f"{name.split('-')[0]}-dense"]
        sparse = block_speed[f"{name.split('-')[0]}-sparse"]
        b["decode_x_dense"], b["prefill_x_dense"] = base["decode_s"] / b["decode_s"], base["prefill_s"] / b["prefill_s"]
        b["decode_x_sparse"], b["prefill_x_sparse"] = sparse["decode_s"] / b["decode_s"], sparse["prefill_s"] / b["prefill_s"]
        gap = f"{b['vs_dense']:.2e}" if b["vs_dense"] is not None else "-"
        print(f"| {name} | {1e3 * b['decode_s']:.3f} | {b['decode_x_dense']:.2f} | {b['decode_x_sparse']:.2f} | "
              f"{1e3 * b['prefill_s']:.2f} | {b['prefill_x_dense']:.2f} | {b['prefill_x_sparse']:.2f} | {gap} |")
        if not name.endswith("dense"):
            checks.append((f"{name}: MoE block, 1-token decode >= {FLOOR_DECODE:g}x dense",
                           b["decode_x_dense"], b["decode_x_dense"] >= FLOOR_DECODE))
    results["moe_block"] = block_speed
    print("\n### floor\n")
    for text, value, ok in checks:
        print(f"- {text}: {value:.2f}x -> {'PASS' if ok else 'FAIL'}")
    print(f"\nload average (1/5/15 min) at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results["exports"] = {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in v.items()} for k, v in exports.items()}
    results["checks"] = [{"check": t, "value": v, "passed": ok} for t, v, ok in checks]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"results written to {args.json}")
    # the floor holds for the form the export writes by default (fused where the op carries the layer)
    return 0 if all(ok for text, _, ok in checks if "fused" in text) else 1


if __name__ == "__main__":
    sys.exit(main())
