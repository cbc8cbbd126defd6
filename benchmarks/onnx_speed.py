"""ONNX Runtime CPU speed of dsq exports: FP32 against INT8 / W8A8 / INT4 graphs of one Llama-shaped model.

Floors checked (on a CPU with AVX512-VNNI, ratios against the ORT FP32 graph measured in the same run): INT8
(W8A8 or weight-only) prefill 1 x 128 >= 2.0x FP32 and >= ONNX Runtime's own ``quantize_dynamic`` graph of the
same model, decode >= 1.5x; INT4 g128 prefill >= 1.3x and decode >= 1.8x; 4-bit linear weights at most 0.27x
their FP16 bytes. The CPU's int8-relevant flags are printed first: the ratios belong to that CPU class.

A random-init Llama checkpoint is written locally (no download), loaded with dsq, quantized with
``quantize_`` per variant, exported with ``export_onnx`` (which validates ORT against torch) and run
by ``OrtCausalLM`` through ``dsq.eval.speed.measure_speed``. Every ORT session and torch use the
same thread count (``--threads``). Timing runs after every export, in interleaved rounds (each
round times every variant once, in rotated order, one session alive at a time) so that changing
load on a shared machine falls on all rows alike; the median over rounds is reported. The FP32 row
is the same exporter's graph with plain MatMuls; the only difference between the rows is the linear
layers' ops (MatMul / MatMulNBits / MatMulInteger / MatMulIntegerToFloat).

W8A8 rows come in both CPU targets (``ExportConfig(cpu_target=...)``, :mod:`dsq.export.cpu_target`):
``portable`` (u8 x u8 ``MatMulInteger`` with zero points, exact on any CPU) and ``vnni`` (per-token
``QuantizeLinear`` + u8 x s8 ``MatMulIntegerToFloat``, exact with VNNI / AMX), and in three activation schemes
(``quantize.w8a8.activations``): per token (``w8a8*``), per tensor asymmetric at run time (``w8a8-tensor*``: one
``DynamicQuantizeLinear`` per distinct input, the integers ORT's own dynamic quantization computes) and static
(``w8a8-static*``, calibrated). The ``ort-dynamic`` rows are a
peer, not dsq exports: ``onnxruntime.quantization.quantize_dynamic`` applied to the FP32 export (QInt8 weights
per tensor or per channel, activations quantized per tensor at run time, lm_head included); their max
|delta logit| is dsq's ``validate_export`` against the fp32 torch model.

Weight bytes are read from the exported ONNX: the initializers feeding each linear layer's matmul
(MatMulNBits: B + scales + zero points; int8 matmuls: the 8-bit weight + its per-channel scale; FP32
MatMul: the weight) against 2 bytes x N x K.

When ``export_onnx``'s validation refuses a graph, the ExportError is recorded and printed, and the same
graph is traced with dsq's own ``_trace`` without the gate (``trace_without_gate``); dsq's
``validate_export`` is then run on it and its max |delta logit| and greedy result are reported in the row.

``-i8p`` / ``-i8pt`` rows are INT4 graphs exported with ``int8_prefill`` (``cpu_target`` vnni): prompts run an int8
copy of the 4-bit weights through the u8 x s8 GEMM, activations per token / per tensor, single tokens ``MatMulNBits``
(:mod:`dsq.export.int8_prefill`). The "session RSS" column is the resident memory a fresh process gains by opening
an ORT session of the graph.

Every graph is exported at opset 23 (``ExportConfig.opset``: one ``Attention``, ``RMSNormalization`` and
``RotaryEmbedding`` node each) unless its name ends in ``-op21``: the same graph from elementary ops, whose
ratios are against the opset-21 FP32 graph (``fp32-op21``) and whose ORT peer is quantized from that graph.

``--kernels`` times single-op ORT graphs [M, K] x [K, N] (fp32 MatMul, the int8 and the n-bit
kernels) to show what this CPU's kernels can reach at all.

    python benchmarks/onnx_speed.py [--threads 2] [--repeats 5] [--only fp32 int4g128-acc4 ...]
        [--keep DIR] [--json PATH] [--kernels] [--kernels-only] [--profile]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

# floors on a VNNI CPU, ratios against the ORT FP32 graph of the same run
FLOOR_INT8_PREFILL, FLOOR_INT8_DECODE = 2.0, 1.5
FLOOR_INT4_PREFILL, FLOOR_INT4_DECODE = 1.3, 1.8

# --------------------------------------------------------------------------------------------- machine

INT8_FLAGS = (
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx_vnni", "avx_vnni_int8", "avx512_bf16", "amx_int8", "amx_bf16",
)


def cpu_info() -> dict:
    """CPU model, cores and the instruction-set flags that decide the int8 / int4 kernels."""
    model, flags = platform.processor() or platform.machine(), set()
    path = Path("/proc/cpuinfo")
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("model name") and model == (platform.processor() or platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "flags_present": [f for f in INT8_FLAGS if f in flags],
        "flags_absent": [f for f in INT8_FLAGS if f not in flags],
    }


def versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
    }


# --------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    name: str
    method: str  # fp32 | rtn | w8a8 | ort-dynamic (ORT's quantize_dynamic of the fp32 graph: a peer row)
    bits: int | None = None
    per_channel: bool = False
    accuracy_level: int = 0
    lm_head: bool = False
    target: str = "portable"  # dsq.export.cpu_target name the export is tuned for
    activations: str = "dynamic"  # W8A8: quantize.w8a8.activations (dynamic per token, dynamic_tensor, static)
    opset: int = 23  # ExportConfig.opset: 23 fused Attention / RMSNormalization / RotaryEmbedding, 21 elementary ops
    int8_prefill: str | None = None  # export.int8_prefill (dynamic | dynamic_tensor): weight-only layers also int8 for prompts

    @property
    def peer(self) -> bool:
        """Not a dsq export: ONNX Runtime's own quantization of the fp32 graph."""
        return self.method == "ort-dynamic"

    @property
    def family(self) -> str:
        if self.method == "fp32":
            return "fp32"
        return "int8" if self.method in ("w8a8", "ort-dynamic") or self.bits == 8 else "int4"

    @property
    def quant_key(self) -> tuple:
        """Variants with the same key share one quantized model (they differ in how they are exported)."""
        return (self.method, self.bits, self.per_channel, self.lm_head, self.activations)

    @property
    def fp32_name(self) -> str:
        """The FP32 row of the same opset: this row's ratios, and ORT's peer graph's source."""
        return "fp32" if self.opset == 23 else f"fp32-op{self.opset}"

    @property
    def description(self) -> str:
        return self._what() + ("" if self.opset == 23 else f", opset {self.opset}")

    def _what(self) -> str:
        if self.method == "fp32":
            return "FP32 (MatMul)"
        if self.peer:
            return (f"ORT quantize_dynamic of the FP32 graph (QInt8 weights, {'per channel' if self.per_channel else 'per tensor'}, "
                    "DynamicQuantizeMatMul: u8 activations per tensor x s8), lm_head included")
        head = ", lm_head quantized" if self.lm_head else ""
        if self.method == "w8a8":
            kernel = "u8 x s8 MatMulIntegerToFloat" if self.target == "vnni" else "u8 x u8 MatMulInteger"
            acts = {"static": "static per-tensor (calibrated)", "dynamic": "dynamic per-token",
                    "dynamic_tensor": "dynamic per-tensor asymmetric"}[self.activations]
            return f"W8A8 {acts}, cpu_target {self.target} ({kernel}){head}"
        gran = "per-channel" if self.per_channel else "g128 sym"
        prompts = {None: "", "dynamic": "; prompts: int8 copy, activations per token",
                   "dynamic_tensor": "; prompts: int8 copy, activations per tensor"}[self.int8_prefill]
        return f"INT{self.bits} {gran} (MatMulNBits bits={self.bits}, acc {self.accuracy_level}{prompts}){head}"


VARIANTS = [
    Variant("fp32", "fp32"),
    Variant("int8wo-acc0", "rtn", 8, per_channel=True, accuracy_level=0),
    Variant("int8wo-acc4", "rtn", 8, per_channel=True, accuracy_level=4),
    Variant("w8a8", "w8a8"),
    Variant("w8a8-vnni", "w8a8", target="vnni"),
    Variant("w8a8-static-vnni", "w8a8", target="vnni", activations="static"),  # static scales: decoder layers only, no lm_head
    Variant("w8a8-tensor", "w8a8", activations="dynamic_tensor"),
    Variant("w8a8-tensor-vnni", "w8a8", target="vnni", activations="dynamic_tensor"),
    Variant("int4g128-acc0", "rtn", 4, accuracy_level=0),
    Variant("int4g128-acc4", "rtn", 4, accuracy_level=4),
    Variant("int8wo-acc4-head", "rtn", 8, per_channel=True, accuracy_level=4, lm_head=True),
    Variant("w8a8-head", "w8a8", lm_head=True),
    Variant("w8a8-vnni-head", "w8a8", lm_head=True, target="vnni"),
    Variant("w8a8-tensor-vnni-head", "w8a8", lm_head=True, target="vnni", activations="dynamic_tensor"),
    Variant("int4g128-acc0-head", "rtn", 4, accuracy_level=0, lm_head=True),
    Variant("int4g128-acc4-head", "rtn", 4, accuracy_level=4, lm_head=True),
    Variant("int4g128-acc4-i8p", "rtn", 4, accuracy_level=4, target="vnni", int8_prefill="dynamic"),
    Variant("int4g128-acc4-head-i8p", "rtn", 4, accuracy_level=4, lm_head=True, target="vnni", int8_prefill="dynamic"),
    Variant("int4g128-acc0-head-i8p", "rtn", 4, accuracy_level=0, lm_head=True, target="vnni", int8_prefill="dynamic"),
    Variant("int4g128-acc4-head-i8pt", "rtn", 4, accuracy_level=4, lm_head=True, target="vnni", int8_prefill="dynamic_tensor"),
    Variant("ort-dynamic", "ort-dynamic"),
    Variant("ort-dynamic-pc", "ort-dynamic", per_channel=True),
    # the same graphs at opset 21 (attention, norms and rotary from elementary ops), each against fp32-op21
    Variant("fp32-op21", "fp32", opset=21),
    Variant("w8a8-tensor-vnni-head-op21", "w8a8", lm_head=True, target="vnni", activations="dynamic_tensor", opset=21),
    Variant("int4g128-acc4-head-op21", "rtn", 4, accuracy_level=4, lm_head=True, opset=21),
    Variant("ort-dynamic-op21", "ort-dynamic", opset=21),
]
BY_NAME = {v.name: v for v in VARIANTS}


def quantize_copy(model: torch.nn.Module, variant: Variant, vocab: int, calib_shape: tuple[int, int]) -> torch.nn.Module:
    """A quantized deep copy of the fp32 ``model`` (the original is not touched)."""
    from dsq.quantize import PerChannel, PerGroup, RTNConfig, TargetSpec, W8A8Config, WeightScheme, quantize_
    from dsq.quantize.methods.w8a8 import ACTIVATION_SCHEMES

    q = copy.deepcopy(model)
    targets = TargetSpec(lm_head=variant.lm_head)
    if variant.method == "rtn":
        gran = PerChannel() if variant.per_channel else PerGroup(128)
        quantize_(q, RTNConfig(scheme=WeightScheme(bits=variant.bits, granularity=gran, symmetric=True), targets=targets), progress=False)
    elif variant.method == "w8a8":
        calibration = torch.randint(0, vocab, calib_shape, generator=torch.Generator().manual_seed(1))
        acts = ACTIVATION_SCHEMES[variant.activations]
        quantize_(q, W8A8Config(activations=acts, targets=targets), calibration=calibration, progress=False)
    return q.eval()


# --------------------------------------------------------------------------------------------- export


def trace_without_gate(model, tokenizer, out: Path, level: int, opset: int, int8_prefill: str | None = None) -> None:
    """The graph ``export_onnx`` traces, written without its validation gate (used only after it refused).

    Same steps as ``export_onnx`` up to the ORT check: copy, ``prepare_for_export``, dsq's ``_trace``;
    then the tokenizer and a minimal manifest. The caller runs dsq's ``validate_export`` on it and
    reports the figures. Uses ``dsq.export.onnx_export._trace`` (private).
    """
    from dsq.export import cache_layout
    from dsq.export.modules import prepare_for_export
    from dsq.export.onnx_export import _add_int8_prefill, _trace
    from dsq.export.runtime import EXPORT_MANIFEST, ONNX_FILE

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    layout = cache_layout(model.config)
    export_model = copy.deepcopy(model)
    plan = prepare_for_export(export_model, level)
    _trace(export_model, layout, model.config.vocab_size, out / ONNX_FILE, opset)
    if int8_prefill:
        from dsq.run.export_step import PROMPT_ACTIVATIONS

        _add_int8_prefill(out / ONNX_FILE, PROMPT_ACTIVATIONS[int8_prefill])
    tokenizer.save_pretrained(str(out))
    manifest = {"cache": layout.to_dict(), "accuracy_level": level, "quantized_modules": plan.to_dict(),
                "files": sorted(p.name for p in out.iterdir() if p.name.startswith(ONNX_FILE)),
                "benchmark_note": "traced by onnx_speed.py with dsq's _trace after export_onnx refused it (validation)"}
    (out / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def ort_quantize_dynamic(src: Path, dst: Path, per_channel: bool) -> int:
    """ONNX Runtime's own int8 graph of dsq's fp32 export ``src``: ``quantize_dynamic`` (QInt8 weights, every
    MatMul with a constant weight, lm_head included; ORT fuses each into ``DynamicQuantizeMatMul``), written to
    ``dst`` with the tokenizer and a manifest copied from ``src``. Returns the quantized matmul count."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from dsq.export.runtime import EXPORT_MANIFEST, ONNX_FILE

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    quantize_dynamic(src / ONNX_FILE, dst / ONNX_FILE, weight_type=QuantType.QInt8, per_channel=per_channel,
                     op_types_to_quantize=["MatMul"], use_external_data_format=True)
    for p in src.iterdir():
        if p.is_file() and not p.name.startswith(ONNX_FILE) and p.name != EXPORT_MANIFEST:
            shutil.copy2(p, dst / p.name)
    manifest = json.loads((src / EXPORT_MANIFEST).read_text())
    manifest.update(files=sorted(p.name for p in dst.iterdir() if p.name.startswith(ONNX_FILE)),
                    benchmark_note=f"onnxruntime.quantization.quantize_dynamic of {src.name} (per_channel={per_channel})")
    (dst / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    graph = onnx.load(str(dst / ONNX_FILE), load_external_data=False).graph
    return sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node)


@dataclass
class ExportInfo:
    path: Path
    max_abs_diff: float
    greedy_equal: bool
    passed: bool
    tolerance: float
    onnx_bytes: int
    seconds: float
    how: str  # "export_onnx" | "rewrite of <dir>"
    export_error: str | None = None


def do_export(model, tokenizer, out: Path, level: int, threads: int, target: str = "portable", opset: int = 23,
              int8_prefill: str | None = None) -> ExportInfo:
    from dsq.export import ExportConfig, cpu_target, export_onnx
    from dsq.run.export_step import PROMPT_ACTIVATIONS

    config = ExportConfig(accuracy_level=level, threads=threads, cpu_target=cpu_target(target), opset=opset,
                          int8_prefill=PROMPT_ACTIVATIONS[int8_prefill] if int8_prefill else None)
    res = export_onnx(model, tokenizer, out, config, overwrite=True)
    v = res.validation
    return ExportInfo(out, v.max_abs_diff, v.greedy_equal, v.passed, v.tolerance, res.onnx_bytes, res.seconds, "export_onnx")


def validate_copy(path: Path, model, threads: int) -> tuple[float, bool, float]:
    """dsq's own ORT-vs-torch validation of an export made outside export_onnx (no tolerance imposed)."""
    from dsq.export import OrtCausalLM, ValidationConfig, cache_layout
    from dsq.export.validate import validate_export

    lm = OrtCausalLM(path, threads=threads)
    report = validate_export(lm, model, cache_layout(model.config), model.config.vocab_size, ValidationConfig(), float("inf"))
    return report.max_abs_diff, report.greedy_equal, report.tolerance


def files_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.iterdir() if p.is_file() and p.name.startswith("model.onnx"))


# --------------------------------------------------------------------------------------------- bytes


_RSS_SCRIPT = """
import os, sys, onnxruntime as ort
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
options = ort.SessionOptions()
options.intra_op_num_threads = int(sys.argv[2])
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
print(rss() - before)
"""


def session_bytes(onnx_path: Path, threads: int) -> int | None:
    """Resident memory an ORT session of ``onnx_path`` adds to a fresh process once created (weights after
    ORT's prepacking and folding); None where /proc is missing."""
    if not Path("/proc/self/statm").exists():
        return None
    done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(onnx_path), str(threads)], capture_output=True, text=True,
                          check=True)
    return int(done.stdout.strip().splitlines()[-1])


def graph_nodes(graph):
    """Every node of ``graph`` and of its subgraphs (the two branches of an int8-prefill graph's ``If``)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                yield from graph_nodes(attr.g)


def linear_weight_bytes(onnx_path: Path, vocab: int) -> dict:
    """Bytes of every linear layer's weight tensors in the graph, by op, against FP16 (2 x N x K).

    Linear layers are MatMulNBits nodes (B, scales, zero points), MatMulInteger nodes with an
    initializer weight (plus the ``.w_scale`` initializer beside it), and MatMul nodes whose second
    input is a 2-D initializer (the FP32 graph's weights). The output projection is the matmul with
    N == vocab. An int8-prefill graph holds each weight-only layer twice (``MatMulNBits`` for single
    tokens, an int8 copy for prompts): both count in the bytes, once in the FP16
    reference.
    """
    import onnx
    from onnx import helper, numpy_helper

    from dsq.export.int8_prefill import WEIGHT_SUFFIX as INT8_PREFILL_SUFFIX

    model = onnx.load(str(onnx_path), load_external_data=True)
    inits = {t.name: t for t in model.graph.initializer}

    def nbytes(name: str) -> int:
        return int(numpy_helper.to_array(inits[name]).nbytes) if name in inits else 0

    groups: dict[str, dict] = {}

    def add(kind: str, head: bool, qbytes: int, n: int, k: int, copy: bool = False) -> None:
        key = f"{kind}{' lm_head' if head else ''}{' (int8 prompt copy)' if copy else ''}"
        g = groups.setdefault(key, {"nodes": 0, "bytes": 0, "fp16_bytes": 0, "params": 0, "copy": copy})
        g["nodes"] += 1
        g["bytes"] += qbytes
        g["fp16_bytes"] += 2 * n * k
        g["params"] += n * k

    seen: set[tuple[str, str]] = set()  # (op, weight): a layer in both branches of an int8-prefill graph counts once
    for node in graph_nodes(model.graph):
        if (node.op_type, node.input[1] if len(node.input) > 1 else "") in seen:
            continue
        seen.add((node.op_type, node.input[1] if len(node.input) > 1 else ""))
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            n, k, bits = int(attrs["N"]), int(attrs["K"]), int(attrs["bits"])
            q = sum(nbytes(x) for x in list(node.input)[1:4] if x)
            add(f"MatMulNBits bits={bits}", n == vocab, q, n, k)
        elif node.op_type in ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul") and node.input[1] in inits:
            w = inits[node.input[1]]
            k, n = (int(d) for d in w.dims)
            if node.op_type == "MatMulInteger":  # dsq's portable form: the scale is the ``.w_scale`` beside it
                scale = node.input[1][: -len(".w_t")] + ".w_scale" if node.input[1].endswith(".w_t") else None
            else:  # b_scale is the op's input (MatMulIntegerToFloat: 4th, DynamicQuantizeMatMul: 3rd)
                scale = node.input[3] if node.op_type == "MatMulIntegerToFloat" else node.input[2]
            q = nbytes(node.input[1]) + (nbytes(scale) if scale in inits else 4 * n)
            add(f"{node.op_type} 8-bit", n == vocab, q, n, k, copy=node.input[1].endswith(INT8_PREFILL_SUFFIX))
        elif node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            k, n = (int(d) for d in inits[node.input[1]].dims)
            add("MatMul fp32", n == vocab, nbytes(node.input[1]), n, k)
    # a prompt copy adds bytes, not weights: the FP16 reference counts each layer once
    total = {"bytes": sum(g["bytes"] for g in groups.values()),
             "fp16_bytes": sum(g["fp16_bytes"] for g in groups.values() if not g["copy"])}
    for g in (*groups.values(), total):
        g["ratio_vs_fp16"] = g["bytes"] / g["fp16_bytes"] if g["fp16_bytes"] else float("nan")
    quantized = [g for key, g in groups.items() if not key.startswith("MatMul fp32")]
    qb, qf = sum(g["bytes"] for g in quantized), sum(g["fp16_bytes"] for g in quantized if not g["copy"])
    return {"groups": groups, "all_linears": total,
            "quantized": {"bytes": qb, "fp16_bytes": qf, "ratio_vs_fp16": qb / qf if qf else float("nan")}}


# --------------------------------------------------------------------------------------------- profile


def profile_prefill(path: Path, threads: int, prompt: torch.Tensor, workdir: Path) -> list[tuple[str, float]]:
    """ORT's own per-op-type time of one prefill (after one untimed run): [(op, share of node time)]."""
    import onnxruntime as ort

    from dsq.export import OrtCausalLM

    lm = OrtCausalLM(path, threads=threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = str(workdir / f"profile_{path.name}")
    lm.session = ort.InferenceSession(str(lm.onnx_path), opts, providers=["CPUExecutionProvider"])
    lm.prefill(prompt)
    lm.prefill(prompt)
    trace = json.loads(Path(lm.session.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last_start = runs[-1]["ts"] if runs else 0
    for e in trace:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= last_start:
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + e["dur"]
    total = sum(per_op.values()) or 1.0
    return sorted(((op, d / total) for op, d in per_op.items()), key=lambda t: -t[1])


# --------------------------------------------------------------------------------------------- kernels


def _session(model_bytes: bytes, threads: int, level: str = "all"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # the "optimized model is hardware specific" warning is expected here
    opts.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }[level]
    fd, optimized = tempfile.mkstemp(suffix=".onnx", dir="/tmp")
    os.close(fd)
    opts.optimized_model_filepath = optimized
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    import onnx

    try:
        ops = [n.op_type for n in onnx.load(optimized).graph.node]
    finally:
        os.unlink(optimized)
    return sess, ops


def _time_run(sess, feeds: dict, min_runs: int, min_seconds: float) -> float:
    for _ in range(3):
        sess.run(None, feeds)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - started < min_seconds:
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def kernel_graphs(m: int, k: int, n: int, rng: np.random.Generator) -> list[tuple[str, bytes, dict, str]]:
    """(name, model bytes, feeds, optimization level) for every kernel at [m, k] x [k, n]."""
    from onnx import TensorProto, helper, numpy_helper

    a = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((k, n), dtype=np.float32) * 0.05).astype(np.float32)
    w_s8 = rng.integers(-127, 128, (k, n), dtype=np.int8)
    w_scale = np.full((n,), 0.01, dtype=np.float32)
    a_s8 = rng.integers(-127, 128, (m, k), dtype=np.int8)
    fvi = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731

    def build(nodes, inits, inputs, outputs) -> bytes:
        graph = helper.make_graph(nodes, "k", inputs, outputs, initializer=[numpy_helper.from_array(v, name) for name, v in inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        return model.SerializeToString()

    out = []
    # fp32 MatMul
    out.append(("fp32 MatMul", build([helper.make_node("MatMul", ["A", "W"], ["Y"])], {"W": w}, [fvi("A", [m, k])], [fvi("Y", [m, n])]), {"A": a}, "all"))
    # DynamicQuantizeLinear (u8) + MatMulInteger u8 x s8 + rescale (the standard ONNX QDQ-dynamic pattern)
    u8s8 = [
        helper.make_node("DynamicQuantizeLinear", ["A"], ["Aq", "As", "Az"]),
        helper.make_node("MatMulInteger", ["Aq", "Wq", "Az"], ["Y32"]),
        helper.make_node("Cast", ["Y32"], ["Yf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["As", "Ws"], ["S"]),
        helper.make_node("Mul", ["Yf", "S"], ["Y"]),
    ]
    g = build(u8s8, {"Wq": w_s8, "Ws": w_scale}, [fvi("A", [m, k])], [fvi("Y", [m, n])])
    out.append(("DQL + MatMulInteger u8s8", g, {"A": a}, "all"))
    out.append(("DQL + MatMulInteger u8s8 [opt basic]", g, {"A": a}, "basic"))
    # DynamicQuantizeMatMul (contrib), int8 weight with per-column scale
    g = build([helper.make_node("DynamicQuantizeMatMul", ["A", "Wq", "Ws"], ["Y"], domain="com.microsoft")],
              {"Wq": w_s8, "Ws": w_scale}, [fvi("A", [m, k])], [fvi("Y", [m, n])])
    out.append(("DynamicQuantizeMatMul (u8 x s8)", g, {"A": a}, "all"))
    # bare MatMulInteger int8 x int8 (activations already int8)
    g = build([helper.make_node("MatMulInteger", ["Aq", "Wq"], ["Y"])], {"Wq": w_s8},
              [helper.make_tensor_value_info("Aq", TensorProto.INT8, [m, k])],
              [helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])])
    out.append(("MatMulInteger s8s8 (bare, A pre-quantized)", g, {"Aq": a_s8}, "all"))
    # what dsq's W8A8 export emits: per-token symmetric int8 + MatMulInteger s8 x s8 + rescale
    tiny = float(np.finfo(np.float32).tiny)
    dsq_nodes = [
        helper.make_node("Abs", ["A"], ["absA"]),
        helper.make_node("ReduceMax", ["absA", "axes"], ["amax"], keepdims=1),
        helper.make_node("Div", ["amax", "c127"], ["s0"]),
        helper.make_node("Max", ["s0", "ctiny"], ["s"]),
        helper.make_node("Div", ["A", "s"], ["x0"]),
        helper.make_node("Round", ["x0"], ["x1"]),
        helper.make_node("Clip", ["x1", "cmin", "cmax"], ["x2"]),
        helper.make_node("Cast", ["x2"], ["q"], to=TensorProto.INT8),
        helper.make_node("MatMulInteger", ["q", "Wq"], ["Y32"]),
        helper.make_node("Cast", ["Y32"], ["Yf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["Yf", "s"], ["Y1"]),
        helper.make_node("Mul", ["Y1", "Ws"], ["Y"]),
    ]
    consts = {"axes": np.array([-1], dtype=np.int64), "c127": np.array(127.0, dtype=np.float32),
              "ctiny": np.array(tiny, dtype=np.float32), "cmin": np.array(-128.0, dtype=np.float32),
              "cmax": np.array(127.0, dtype=np.float32), "Wq": w_s8, "Ws": w_scale}
    out.append(("per-token quant + MatMulInteger s8s8 (dsq W8A8 pattern)", build(dsq_nodes, consts, [fvi("A", [m, k])], [fvi("Y", [m, n])]), {"A": a}, "all"))
    # the same integers as u8 with zero point 128 (q + 128): MatMulInteger's int32 result is identical
    u8_nodes = dsq_nodes[:7] + [
        helper.make_node("Add", ["x2", "c128"], ["x3"]),
        helper.make_node("Cast", ["x3"], ["q"], to=TensorProto.UINT8),
        helper.make_node("MatMulInteger", ["q", "Wq", "zp128"], ["Y32"]),
    ] + dsq_nodes[9:]
    consts_u8 = {**consts, "c128": np.array(128.0, dtype=np.float32), "zp128": np.array(128, dtype=np.uint8)}
    out.append(("per-token quant as u8 (zp 128) + MatMulInteger u8s8 (inexact on AVX2: saturating)",
                build(u8_nodes, consts_u8, [fvi("A", [m, k])], [fvi("Y", [m, n])]), {"A": a}, "all"))
    u8u8_nodes = [*u8_nodes[:9], helper.make_node("MatMulInteger", ["q", "Wu", "zp128", "zp128"], ["Y32"]), *u8_nodes[10:]]
    consts_u8u8 = {**consts_u8, "Wu": (w_s8.astype(np.int16) + 128).astype(np.uint8)}
    del consts_u8u8["Wq"]
    out.append(("per-token quant as u8 (zp 128) + MatMulInteger u8u8 (weights u8 zp 128; exact)",
                build(u8u8_nodes, consts_u8u8, [fvi("A", [m, k])], [fvi("Y", [m, n])]), {"A": a}, "all"))
    # what dsq's cpu_target vnni graph emits: per-token QuantizeLinear (u8, zp 128) + MatMulIntegerToFloat u8 x s8
    vnni_nodes = dsq_nodes[:1] + [
        helper.make_node("ReduceMax", ["absA", "axes"], ["amax1"], keepdims=0),
        helper.make_node("Div", ["amax1", "c127"], ["t0"]),
        helper.make_node("Max", ["t0", "ctiny"], ["t"]),
        helper.make_node("Shape", ["t"], ["tshape"]),
        helper.make_node("Expand", ["zp128", "tshape"], ["tzero"]),
        helper.make_node("QuantizeLinear", ["A", "t", "tzero"], ["qa"], axis=0),
        helper.make_node("MatMulIntegerToFloat", ["qa", "Wq", "one", "Ws", "zp128"], ["Yt"], domain="com.microsoft"),
        helper.make_node("Unsqueeze", ["t", "one_axis"], ["tcol"]),
        helper.make_node("Mul", ["Yt", "tcol"], ["Y"]),
    ]
    consts_vnni = {**consts_u8, "one": np.array(1.0, dtype=np.float32), "one_axis": np.array([1], dtype=np.int64)}
    del consts_vnni["c128"], consts_vnni["cmin"], consts_vnni["cmax"]
    out.append(("per-token QuantizeLinear u8 + MatMulIntegerToFloat u8s8 (dsq cpu_target vnni; exact with VNNI)",
                build(vnni_nodes, consts_vnni, [fvi("A", [m, k])], [fvi("Y", [m, n])]), {"A": a}, "all"))
    # INT4 g128 on the int8 GEMM: the groups as a batch, [G, m, 128] x [G, 128, n] u8 x s8 (one per-tensor activation
    # scale, each group's weight scales per column), then summed over the groups. Not an export form: it shows whether
    # a CPU whose int8 GEMM outruns MatMulNBits (AMX) could run 4-bit prefill faster this way.
    if k % 128 == 0:
        groups = k // 128
        grouped = [
            helper.make_node("Reshape", ["A", "gshape"], ["A3"]),
            helper.make_node("Transpose", ["A3"], ["At"], perm=[1, 0, 2]),
            helper.make_node("DynamicQuantizeLinear", ["At"], ["Aq", "As", "Az"]),
            helper.make_node("MatMulIntegerToFloat", ["Aq", "Wg", "As", "Wgs", "Az"], ["Yg"], domain="com.microsoft"),
            helper.make_node("ReduceSum", ["Yg", "axis0"], ["Y"], keepdims=0),
        ]
        inits = {"gshape": np.array([m, groups, 128], dtype=np.int64), "Wg": rng.integers(-8, 8, (groups, 128, n), dtype=np.int8),
                 "Wgs": np.full((groups, 1, n), 0.01, dtype=np.float32), "axis0": np.array([0], dtype=np.int64)}
        out.append(("INT4 g128 as int8 groups: DQL + MatMulIntegerToFloat [G, m, 128] x [G, 128, n] + ReduceSum",
                    build(grouped, inits, [fvi("A", [m, k])], [fvi("Y", [m, n])]), {"A": a}, "all"))
    # MatMulNBits
    per_channel_block = max(16, 1 << (k - 1).bit_length())
    for bits, block in ((4, 128), (8, 128), (8, per_channel_block)):
        blocks = -(-k // block)
        blob = block * bits // 8
        b = rng.integers(0, 256, (n, blocks, blob), dtype=np.uint8)
        scales = np.full((n * blocks,), 0.01, dtype=np.float32)
        for level in (0, 4):
            node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
                                    K=k, N=n, bits=bits, block_size=block, accuracy_level=level)
            g = build([node], {"B": b, "scales": scales}, [fvi("A", [m, k])], [fvi("Y", [m, n])])
            tag = "per-channel block" if block == per_channel_block and block != 128 else "block"
            out.append((f"MatMulNBits bits={bits} {tag} {block} acc {level}", g, {"A": a}, "all"))
    return out


def run_kernels(shapes: list[tuple[int, int]], ms: list[int], threads: int, min_runs: int, min_seconds: float) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for m in ms:
        for k, n in shapes:
            base = None
            print(f"\n#### kernels at [{m}, {k}] x [{k}, {n}], {threads} threads\n")
            print("| kernel | ms | GFLOP/s | x fp32 MatMul | ops after ORT optimization |")
            print("|---|---|---|---|---|")
            for name, graph, feeds, level in kernel_graphs(m, k, n, rng):
                try:
                    sess, ops = _session(graph, threads, level)
                    sec = _time_run(sess, feeds, min_runs, min_seconds)
                    del sess
                except Exception as exc:  # an op this build does not run: say so, keep going
                    print(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:150]} | | | |")
                    rows.append({"m": m, "k": k, "n": n, "kernel": name, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                if base is None:
                    base = sec
                gflops = 2 * m * k * n / sec / 1e9
                rows.append({"m": m, "k": k, "n": n, "kernel": name, "seconds": sec, "gflops": gflops,
                             "x_fp32": base / sec, "ops": ops})
                print(f"| {name} | {sec * 1e3:.3f} | {gflops:.1f} | {base / sec:.2f} | {' '.join(ops)} |", flush=True)
    return rows


# --------------------------------------------------------------------------------------------- main


def timed_rounds(makers: dict, config, vocab: int) -> dict[str, dict]:
    """Interleaved timing: ``config.repeats`` rounds, each running every variant once, order rotated.

    On a shared machine the load changes over minutes; measuring the variants one after the other
    would give each a different share of it. Each round opens the variant's session afresh (one
    session alive at a time), runs ``config.warmup`` untimed prefill + 4 decode steps, then one timed
    prefill + ``config.new_tokens`` decode steps (``dsq.eval.speed.measure_speed`` with repeats=1).
    Returns per variant the median, min and max tokens/s over the rounds.
    """
    from dataclasses import replace

    from dsq.eval.speed import measure_speed

    names = list(makers)
    one = replace(config, repeats=1)
    runs: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    print(f"\ntiming: {config.repeats} interleaved rounds x {len(names)} variants", flush=True)
    for r in range(config.repeats):
        started = time.perf_counter()
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            lm = makers[name]()
            res = measure_speed(lm, one, vocab)
            del lm
            runs[name].append((res.prefill_seconds, res.decode_seconds))
        print(f"  round {r + 1}/{config.repeats}: {time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.2f}", flush=True)
    out = {}
    tokens = config.batch * config.prompt_len
    steps = config.batch * config.new_tokens
    for name, rr in runs.items():
        pre = [tokens / p for p, _ in rr]
        dec = [steps / d for _, d in rr]
        out[name] = {
            "prefill_tokens_per_s": tokens / statistics.median(p for p, _ in rr),
            "decode_tokens_per_s": steps / statistics.median(d for _, d in rr),
            "prefill_min": min(pre), "prefill_max": max(pre), "decode_min": min(dec), "decode_max": max(dec),
            "prefill_seconds": [p for p, _ in rr], "decode_seconds": [d for _, d in rr],
            "batch": config.batch, "prompt_len": config.prompt_len, "new_tokens": config.new_tokens,
        }
    return out


def build_model(args, workdir: Path):
    from dsq.core.loading import load_checkpoint
    from dsq.tools.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(
        "llama", workdir / "checkpoint", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
    )
    loaded = load_checkpoint(ckpt)
    return loaded.model.eval(), loaded.tokenizer


def fmt_bytes(b: float) -> str:
    return f"{b / 2**20:.2f} MiB"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads and torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--only", nargs="+", default=None, choices=list(BY_NAME), metavar="VARIANT",
                   help=f"variants to run (fp32 always runs: it is the baseline); one of {', '.join(BY_NAME)}")
    p.add_argument("--keep", type=Path, default=None, help="keep the checkpoint and exports in this directory")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--kernels", action="store_true", help="also run the single-op kernel microbenchmark")
    p.add_argument("--kernels-only", action="store_true", help="only the kernel microbenchmark")
    p.add_argument("--kernel-m", type=int, nargs="+", default=[128, 1],
                   help="rows M of the kernel microbenchmark (default 128 = prefill, 1 = decode)")
    p.add_argument("--kernel-shapes", nargs="+", default=None, metavar="KxN",
                   help="kernel shapes (default: hidden x intermediate, intermediate x hidden, hidden x vocab)")
    p.add_argument("--profile", action="store_true", help="ORT per-op-type time of one prefill per variant")
    p.add_argument("--no-torch", action="store_true", help="skip the torch FP32 reference row")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    g = p.add_argument_group("model shape (Llama)")
    g.add_argument("--hidden", type=int, default=512)
    g.add_argument("--intermediate", type=int, default=1408)
    g.add_argument("--layers", type=int, default=6)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--kv-heads", type=int, default=4)
    g.add_argument("--vocab", type=int, default=8192)
    g.add_argument("--max-positions", type=int, default=512)
    return p.parse_args(argv)


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    machine = cpu_info()
    vers = versions()
    print(f"machine: {machine['cpu']}, {machine['logical_cores']} logical cores ({machine['usable_cores']} usable)")
    print(f"int8-relevant CPU flags present: {' '.join(machine['flags_present']) or '-'}")
    print(f"                         absent: {' '.join(machine['flags_absent']) or '-'}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"load average (1/5/15 min) at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          "(a shared machine: other load adds noise to every timing)")
    print(f"threads: {args.threads} (ORT intra_op_num_threads and torch.set_num_threads); "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; repeats {args.repeats}")
    results: dict = {"machine": machine, "versions": vers, "args": {k: str(v) for k, v in vars(args).items()}}

    shapes = ([tuple(int(x) for x in s.lower().split("x")) for s in args.kernel_shapes] if args.kernel_shapes else
              [(args.hidden, args.intermediate), (args.intermediate, args.hidden), (args.hidden, args.vocab)])
    if args.kernels_only:
        results["kernels"] = run_kernels(shapes, args.kernel_m, args.threads, max(5, 5 * args.repeats), 0.3 * args.repeats)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        return 0

    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="onnx_speed_", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, workdir, results, shapes)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(args, workdir: Path, results: dict, shapes) -> int:
    from dsq.core.errors import ExportError
    from dsq.eval.speed import SpeedConfig, TorchCachedLM
    from dsq.export import OrtCausalLM

    model, tokenizer = build_model(args, workdir)
    params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    linear_params = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    head_params = model.lm_head.weight.numel()
    print(f"\nmodel: Llama, hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv heads, vocab {cfg.vocab_size}, "
          f"tie_word_embeddings {cfg.tie_word_embeddings}")
    print(f"parameters: {params:,} ({params / 1e6:.2f}M): decoder linears {linear_params:,}, lm_head {head_params:,}, "
          f"embeddings {model.model.embed_tokens.weight.numel():,}")
    results["model"] = {"params": params, "decoder_linear_params": linear_params, "lm_head_params": head_params,
                        "config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                                  "num_attention_heads", "num_key_value_heads", "vocab_size")}}
    speed_cfg = SpeedConfig(batch=1, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats)
    print(f"speed: batch 1, prompt {speed_cfg.prompt_len}, {speed_cfg.new_tokens} new tokens (greedy), "
          f"median of {speed_cfg.repeats} interleaved rounds, each after {speed_cfg.warmup} warm-up; random prompt ids in [0, {cfg.vocab_size})")

    rows: list[dict] = []
    makers: dict[str, object] = {}  # variant -> () -> CachedLM, for the interleaved timing rounds
    if not args.no_torch:
        rows.append({"variant": "torch-fp32", "description": "torch FP32 eager (TorchCachedLM), reference"})
        makers["torch-fp32"] = lambda: TorchCachedLM(model)

    named = [v for v in VARIANTS if args.only is None or v.name in args.only]
    baselines = {"fp32"} | {v.fp32_name for v in named}  # every row's FP32 of the same opset is measured too
    wanted = [v for v in VARIANTS if v.name in baselines or v in named]
    quant_cache: tuple[tuple, torch.nn.Module] | None = None

    def export_or_trace(variant: Variant, qmodel, out: Path, label: str) -> ExportInfo:
        """export_onnx; if its validation refuses the graph, record why and trace it without the gate."""
        try:
            return do_export(qmodel, tokenizer, out, variant.accuracy_level, args.threads, variant.target, variant.opset,
                             variant.int8_prefill)
        except ExportError as exc:
            error = str(exc)
            if "does not match PyTorch" not in error:
                raise
        print(f"[{label}] export_onnx(accuracy_level={variant.accuracy_level}) raised ExportError: {error[:300]}", flush=True)
        t0 = time.perf_counter()
        trace_without_gate(qmodel, tokenizer, out, variant.accuracy_level, variant.opset, variant.int8_prefill)
        diff, greedy, _ = validate_copy(out, qmodel, args.threads)
        return ExportInfo(out, diff, greedy, False, float("nan"), files_bytes(out), time.perf_counter() - t0,
                          "export_onnx refused it (validation); same graph traced without the gate", error)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    for variant in wanted:
        started = time.perf_counter()
        out = workdir / variant.name
        try:
            if quant_cache is None or quant_cache[0] != variant.quant_key:
                quant_cache = None
                quantized = variant.method not in ("fp32", "ort-dynamic")
                qmodel = quantize_copy(model, variant, cfg.vocab_size, (8, args.prompt_len)) if quantized else model
                quant_cache = (variant.quant_key, qmodel)
            qmodel = quant_cache[1]
            if variant.peer:
                t0 = time.perf_counter()
                changed = ort_quantize_dynamic(workdir / variant.fp32_name, out, variant.per_channel)
                diff, greedy, _ = validate_copy(out, model, args.threads)
                info = ExportInfo(out, diff, greedy, False, float("nan"), files_bytes(out), time.perf_counter() - t0,
                                  f"onnxruntime quantize_dynamic of the fp32 graph: {changed} int8 matmuls")
            else:
                info = export_or_trace(variant, qmodel, out, variant.name)
        except Exception as exc:
            print(f"[{variant.name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"variant": variant.name, "description": variant.description, "family": variant.family,
                         "peer": variant.peer, "failed": f"{type(exc).__name__}: {exc}"})
            continue
        wb = linear_weight_bytes(out / "model.onnx", cfg.vocab_size)
        row = {"variant": variant.name, "description": variant.description, "family": variant.family,
               "session_bytes": session_bytes(out / "model.onnx", args.threads),
               "accuracy_level": variant.accuracy_level, "lm_head_quantized": variant.lm_head or variant.peer,
               "cpu_target": variant.target, "peer": variant.peer, "opset": variant.opset, "fp32_row": variant.fp32_name,
               "weights": wb, "export": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(info).items()}}
        makers[variant.name] = lambda out=out: OrtCausalLM(out, threads=args.threads)
        if args.profile:
            row["profile_prefill"] = profile_prefill(out, args.threads, prompt, workdir)
            top = ", ".join(f"{op} {share:.0%}" for op, share in row["profile_prefill"][:6])
            print(f"[{variant.name}] ORT prefill op time: {top}")
        rows.append(row)
        print(f"[{variant.name}] ready: max|dlogit| {info.max_abs_diff:.3g} (greedy equal {info.greedy_equal}), {info.how}, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    del quant_cache

    failed = [r for r in rows if "failed" in r]
    rows = [r for r in rows if "failed" not in r]
    speeds = timed_rounds(makers, speed_cfg, cfg.vocab_size)
    for r in rows:
        r["speed"] = speeds[r["variant"]]

    by_name = {r["variant"]: r for r in rows}
    for r in rows:
        base = by_name[r.get("fp32_row", "fp32")]["speed"]  # torch's row: against the opset-23 FP32 graph
        r["prefill_x_fp32"] = r["speed"]["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        r["decode_x_fp32"] = r["speed"]["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    results["rows"] = rows
    results["failed"] = failed

    print(f"\n### ORT CPU speed, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.threads} threads "
          f"(median of {args.repeats} interleaved rounds, (min-max) in brackets; x FP32 = against the ORT FP32 row "
          "of the same opset)\n")
    print("| variant | what | prefill tok/s | x FP32 | decode tok/s | x FP32 | quantized linears: bytes (x FP16) | "
          "all linears incl. lm_head: bytes (x FP16) | ONNX files | session RSS | max \\|Δlogit\\| at export | greedy = torch | export |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["speed"]
        if "weights" in r:
            q, a = r["weights"]["quantized"], r["weights"]["all_linears"]
            qtxt = f"{fmt_bytes(q['bytes'])} ({q['ratio_vs_fp16']:.3f}x)" if q["fp16_bytes"] else "-"
            atxt = f"{fmt_bytes(a['bytes'])} ({a['ratio_vs_fp16']:.3f}x)"
            e = r["export"]
            how = ("passed" if e["passed"] else
                   "export_onnx: ExportError (validation); same graph traced without the gate" if e["export_error"] else
                   "peer: ORT quantize_dynamic (no gate)" if r.get("peer") else "?")
            rss = fmt_bytes(r["session_bytes"]) if r.get("session_bytes") is not None else "-"
            tail = f"{qtxt} | {atxt} | {fmt_bytes(e['onnx_bytes'])} | {rss} | {e['max_abs_diff']:.3g} | {e['greedy_equal']} | {how} |"
        else:
            tail = "- | - | - | - | - | - | torch eager |"
        print(f"| {r['variant']} | {r['description']} | {s['prefill_tokens_per_s']:.1f} ({s['prefill_min']:.0f}-{s['prefill_max']:.0f}) | "
              f"{r['prefill_x_fp32']:.2f} | {s['decode_tokens_per_s']:.1f} ({s['decode_min']:.1f}-{s['decode_max']:.1f}) | "
              f"{r['decode_x_fp32']:.2f} | {tail}")

    # weight bytes detail and requirement checks
    print("\n### linear weight bytes read from the exported graphs (initializers of each matmul)\n")
    print("| variant | op group | nodes | params | bytes | FP16 bytes | x FP16 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for key, g in r.get("weights", {}).get("groups", {}).items():
            print(f"| {r['variant']} | {key} | {g['nodes']} | {g['params']:,} | {g['bytes']:,} | {g['fp16_bytes']:,} | {g['ratio_vs_fp16']:.4f} |")

    checks = []
    for r in rows:
        if r.get("peer") or r.get("family") in ("fp32", None):
            continue
        tag = r["variant"]
        best_peer = max((p["prefill_x_fp32"] for p in rows if p.get("peer") and p["opset"] == r["opset"]), default=None)
        if r["family"] == "int8":
            checks.append((f"INT8 prefill >= {FLOOR_INT8_PREFILL}x ORT FP32 [{tag}]", r["prefill_x_fp32"], r["prefill_x_fp32"] >= FLOOR_INT8_PREFILL))
            if best_peer is not None:
                checks.append((f"INT8 prefill >= ORT quantize_dynamic's best ({best_peer:.3f}x FP32) [{tag}]", r["prefill_x_fp32"], r["prefill_x_fp32"] >= best_peer))
            checks.append((f"INT8 decode >= {FLOOR_INT8_DECODE}x ORT FP32 [{tag}]", r["decode_x_fp32"], r["decode_x_fp32"] >= FLOOR_INT8_DECODE))
        elif r["family"] == "int4":
            checks.append((f"INT4 prefill >= {FLOOR_INT4_PREFILL}x ORT FP32 [{tag}]", r["prefill_x_fp32"], r["prefill_x_fp32"] >= FLOOR_INT4_PREFILL))
            checks.append((f"INT4 decode >= {FLOOR_INT4_DECODE}x ORT FP32 [{tag}]", r["decode_x_fp32"], r["decode_x_fp32"] >= FLOOR_INT4_DECODE))
    for r in rows:
        for key, g in r.get("weights", {}).get("groups", {}).items():
            if key.startswith("MatMulNBits bits=4"):
                checks.append((f"4-bit linear bytes <= 0.27x FP16 [{r['variant']}: {key}]", g["ratio_vs_fp16"], g["ratio_vs_fp16"] <= 0.27))
    print("\n### requirement checks\n")
    print(f"- model parameters: {params:,} (>= 15M: {'PASS' if params >= 15_000_000 else 'FAIL'})")
    for text, value, ok in checks:
        print(f"- {text}: {value:.3f} -> {'PASS' if ok else 'FAIL'}")
    for r in rows:
        print(f"- decode [{r['variant']}]: {r['speed']['decode_tokens_per_s']:.1f} tok/s ({r['decode_x_fp32']:.2f}x ORT FP32)")
    results["checks"] = [{"check": t, "value": v, "passed": ok} for t, v, ok in checks]
    errors = {r["variant"]: r["export"]["export_error"] for r in rows if r.get("export", {}).get("export_error")}
    if errors:
        print("\nexport_onnx refused these graphs (the rows were measured on the same graph traced without the validation gate):")
        for name, err in errors.items():
            print(f"- {name}: {err}")
    if failed:
        print("\nnot measured:")
    for r in failed:
        print(f"- {r['variant']}: {r.get('failed') or 'skipped: ' + r['skipped']}")

    if args.kernels:
        results["kernels"] = run_kernels(shapes, args.kernel_m, args.threads, max(5, 5 * args.repeats), 0.3 * args.repeats)
    print(f"\nload average (1/5/15 min) at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
