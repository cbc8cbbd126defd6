"""``dsq plan`` against real runs: peak host memory and artifact bytes, planned and measured.

Runs the pipeline (``dsq.run.pipeline.run``) on the bundled model and on two synthetic
DeepSeek-V3-shaped checkpoints (``dsq.tools.synthetic``, BF16, of two sizes), each in memory and
streamed, each run in a fresh process, two at a time, and prints per run:

* the plan's peak host memory of that path (``Plan.in_memory`` / ``Plan.streaming``);
* the peak RSS of the run's quantization, as the run measures it (``dsq.eval.memory.PeakRSS`` around
  the quantization step: the report's ``peak_rss_bytes``), and the peak RSS of the whole process
  (sampled ``VmHWM``; a streamed run of a model that fits also evaluates it in memory afterwards);
* the artifact's tensor bytes, planned (the recipe's row) and written (the sum of the safetensors
  data sections of its weight files).

Every run uses RTN (calibration-free, the default method) in float32 with a small evaluation
(no perplexity, no multiple choice, no reload check, fidelity on 32 tokens).

    python benchmarks/plan_vs_measured.py --root /tmp/dsq-plan-vs-measured
    python benchmarks/plan_vs_measured.py --root DIR --json results.json   # the rows as JSON too
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

MiB = 1 << 20

INT4_G128 = ("quantize.weights.bits=4", "quantize.weights.group_size=128")
INT4_G32_ASYM = ("quantize.weights.bits=4", "quantize.weights.group_size=32", "quantize.weights.symmetric=false")
INT8_CHANNEL = ("quantize.weights.bits=8", "quantize.weights.granularity=channel")
SCHEMES = {INT4_G128: "int4 g128", INT4_G32_ASYM: "int4 g32 asym", INT8_CHANNEL: "int8 per-channel"}

EVAL = ("progress=false", "eval.perplexity=null", "eval.multiple_choice=null", "eval.reload_check=false",
        "eval.fidelity.seq_len=16", "eval.fidelity.max_tokens=32")

SYNTHETIC = {  # name -> deepseek_v3_config sizes (BF16 on disk)
    "synthetic-small": {"hidden_size": 512, "num_layers": 4, "num_experts": 16, "moe_intermediate_size": 256},
    "synthetic-large": {"hidden_size": 768, "num_layers": 4, "num_experts": 24, "moe_intermediate_size": 384},
}

RUNS: tuple[tuple[str, bool, tuple[str, ...]], ...] = (  # (model, streaming, scheme): every scheme on two models
    ("bundled", False, INT4_G128),
    ("bundled", True, INT4_G32_ASYM),
    ("synthetic-small", False, INT8_CHANNEL),
    ("synthetic-small", True, INT4_G128),
    ("synthetic-large", False, INT4_G32_ASYM),
    ("synthetic-large", True, INT8_CHANNEL),
)


@dataclass(frozen=True)
class Row:
    """One run, planned and measured (bytes)."""

    model: str
    streaming: bool
    scheme: str
    checkpoint_bytes: int
    planned_peak: int
    quantization_peak: int
    process_peak: int
    import_rss: int
    planned_artifact: int
    written_artifact: int
    seconds: float

    @property
    def error(self) -> float:
        """(planned - measured) / measured, of the quantization's peak RSS."""
        return (self.planned_peak - self.quantization_peak) / self.quantization_peak


# ----------------------------------------------------------------------------- one run, in its own process


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(overrides: list[str]) -> None:
    """Run the recipe of ``overrides`` with the pipeline; print one JSON line of measurements.

    The process's high-water mark is sampled every 2 ms: the run resets it (``PeakRSS``) around
    its quantization, so the last reading alone would miss what came before.
    """
    peak = [0]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], _status_bytes("VmHWM"))
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    from dsq.run.pipeline import run
    from dsq.run.recipe import load_recipe

    import_rss = _status_bytes("VmRSS")
    recipe = load_recipe(None, overrides)
    run(recipe)
    report = json.loads((Path(recipe.output) / "report.json").read_text())
    quantization = report["candidates"][0]["extra"]["quantization"]
    time.sleep(0.01)
    print(json.dumps({"quantization_peak": quantization["peak_rss_bytes"], "import_rss": import_rss,
                      "process_peak": max(peak[0], _status_bytes("VmHWM"))}))


def _measure(overrides: list[str]) -> tuple[dict, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", *overrides], capture_output=True, text=True, timeout=1800,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"run {' '.join(overrides)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - started


# ----------------------------------------------------------------------------- checkpoints, plans, table


def checkpoints(root: Path) -> dict[str, Path]:
    """The bundled model and the synthetic checkpoints (written under ``root`` once)."""
    import torch

    from dsq.core.checkpoint import bundled_model_path
    from dsq.tools.synthetic import deepseek_v3_config, write_synthetic_checkpoint

    found = {"bundled": bundled_model_path()}
    for name, sizes in SYNTHETIC.items():
        path = root / name
        if not (path / "config.json").is_file():
            shutil.rmtree(path, ignore_errors=True)
            write_synthetic_checkpoint(path, deepseek_v3_config(**sizes), dtype=torch.bfloat16)
        found[name] = path
    return found


def _row(model: str, path: Path, streaming: bool, scheme: tuple[str, ...], out: Path, measured: dict, seconds: float) -> Row:
    from dsq.run.recipe import load_recipe
    from dsq.tools.plan import plan_checkpoint
    from dsq.tools.testing import tensor_data_bytes

    plan = plan_checkpoint(path, load_recipe(None, list(scheme)))
    estimate = plan.streaming if streaming else plan.in_memory
    return Row(
        model=model, streaming=streaming, scheme=SCHEMES[scheme], checkpoint_bytes=plan.source.tensor_bytes,
        planned_peak=estimate.total, quantization_peak=measured["quantization_peak"], process_peak=measured["process_peak"],
        import_rss=measured["import_rss"], planned_artifact=plan.schemes[-1].tensor_bytes,
        written_artifact=tensor_data_bytes(sorted(out.glob("*.safetensors"))), seconds=round(seconds, 1),
    )


def measure(root: Path, jobs: int = 2) -> list[Row]:
    """Every run of :data:`RUNS`, planned and measured.

    Args:
        root: directory for the synthetic checkpoints and the artifacts.
        jobs: runs at a time (each in its own process).

    Returns:
        The rows, in :data:`RUNS` order.
    """
    root.mkdir(parents=True, exist_ok=True)
    paths = checkpoints(root)

    def one(index: int) -> Row:
        model, streaming, scheme = RUNS[index]
        out = root / f"out-{index}"
        shutil.rmtree(out, ignore_errors=True)
        overrides = [f"model={paths[model]}", f"output={out}", f"streaming={str(streaming).lower()}", *EVAL, *scheme]
        measured, seconds = _measure(overrides)
        return _row(model, paths[model], streaming, scheme, out, measured, seconds)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, range(len(RUNS))))


def table(rows: list[Row]) -> str:
    """The rows as Markdown (MiB)."""
    header = ("| model (checkpoint MiB) | path | scheme | planned peak | measured peak (quantization) | plan error | "
              "process peak | artifact planned = written (bytes) |")
    lines = [header, "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        same = "=" if r.planned_artifact == r.written_artifact else "!="
        lines.append(
            f"| {r.model} ({r.checkpoint_bytes / MiB:,.1f}) | {'streamed' if r.streaming else 'in memory'} | {r.scheme} | "
            f"{r.planned_peak / MiB:,.0f} | {r.quantization_peak / MiB:,.0f} | {100 * r.error:+.1f} % | "
            f"{r.process_peak / MiB:,.0f} | {r.planned_artifact:,} {same} {r.written_artifact:,} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="directory for the synthetic checkpoints and the artifacts")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = measure(args.root, args.jobs)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    print(table(rows))
    print(f"\nlargest plan error: {max(abs(r.error) for r in rows):.1%}; "
          f"artifact bytes exact: {all(r.planned_artifact == r.written_artifact for r in rows)}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        main()
