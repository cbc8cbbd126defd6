"""dsq's 4-bit PTQ methods beside the public AutoRound package (pip ``auto-round``), one scorer for all.

Every row quantizes the same checkpoint to symmetric int4 with one group size, from the same
calibration token windows: dsq's own loader (:func:`dsq.quantize.calibration_data.load_calibration_with_summary`)
with the recipe's ``quantize.calibration`` settings (bundled calibration split or ``--calibration-data FILE``,
``--samples`` x ``--seq-len`` tokens, seed 0). Every row is scored the same way: held-out perplexity from the
recipe's ``eval.perplexity`` section (bundled held-out split, context 256, stride 128) with
:func:`dsq.eval.perplexity`, against the fp32 model.

- dsq rows (``rtn``, ``gptq``, ``awq``, ``autoround``) run the pipeline with recipe overrides, as
  ``benchmarks/ptq_sweep.py`` does; ``autoround`` gets ``quantize.autoround.steps/seed`` (and ``lr``
  when given) and ``quantize.calibration.batch_size`` (sequences per step).
- ``peer`` is AutoRound's SignRound (``auto_round.AutoRound(model, ...).quantize()``) on the fp32
  model loaded as dsq loads it, fed the dsq calibration tensor as a list of ``(batch, seq_len)``
  token-id tensors, tuned in fp32 (``amp=False``; AutoRound's CPU default is bf16) with the same
  steps, batch and seed. Its in-memory model holds the quantize-dequantized weights and is scored
  directly. With transformers 5 AutoRound unfuses a fused MoE experts module (3-D
  ``gate_up_proj``/``down_proj``) into one ``nn.Linear`` per expert and projection before quantizing.

AutoRound 0.16 keeps in 16 bit every int weight-only Linear whose output or input width is not a
multiple of 32, whatever the group size (``apply_layer_config_special_cases`` in
``auto_round.compressors.layer_config_resolver``); a ragged last group is otherwise zero-padded
(``reshape_pad_tensor_by_group_size``). By default the peer row puts those layers back to the run's
scheme, so every row quantizes the layers dsq targets; ``--peer-shape-skips`` keeps AutoRound's rule.
The "kept" column lists the layers dsq targets that a row left in 16 bit (lm_head and MoE routers
are kept in every row: dsq's default targets and AutoRound's defaults).

    python benchmarks/learned_rounding.py --model DIR [--group-size 32|128|0] [--samples 128] [--seq-len 256] [--calibration-data FILE]
        [--steps 200] [--seeds 0 1 2] [--methods rtn gptq awq autoround peer] [--out runs/lr]

``--group-size 0`` means one scale per output channel. Learned rounding depends on the order in which
it draws calibration batches, so ``autoround`` and ``peer`` run once per ``--seeds`` value (RTN, GPTQ
and AWQ do not draw) and a second table gives each one's mean and range over the seeds, and its mean
increase as a multiple of GPTQ's. Prints Markdown tables and writes ``<out>/learned_rounding.json``;
dsq rows leave their artifacts under ``<out>/<row name>`` (``<out>/seed<N>/<row name>`` for seeded rows).
"""
from __future__ import annotations

import os

# Nothing is fetched at run time, as under the CLI: set before transformers and huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import hashlib
import importlib.metadata
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from dsq.core.checkpoint import bundled_model_path, validate_checkpoint
from dsq.core.loading import load_checkpoint
from dsq.eval import Evaluator, machine_info, perplexity
from dsq.eval.memory import avx512_flags
from dsq.quantize.calibration_data import load_calibration_with_summary
from dsq.quantize.method import METHODS
from dsq.quantize.sections import CalibrationSection
from dsq.quantize.targets import select_targets
from dsq.run.pipeline import run
from dsq.run.recipe import load_recipe
from dsq.run.steps import benchmark_suite

DSQ_METHODS = ("rtn", "gptq", "awq", "autoround")
PEER = "peer"
PEER_PACKAGE = "auto-round"
SHAPE_MULTIPLE = 32  # AutoRound keeps an int Linear in 16 bit unless both widths are multiples of this


@dataclass(frozen=True)
class Settings:
    """One benchmark run: the checkpoint, the int4 format and the calibration/tuning budget."""

    model: Path
    group_size: int  # 0: one scale per output channel
    samples: int
    seq_len: int
    steps: int
    batch_size: int
    lr: float | None
    seed: int  # the learned-rounding seed of this row (one of ``seeds``)
    out: Path
    peer_shape_skips: bool
    autoround_set: tuple[str, ...] = ()  # extra ``quantize.autoround.KEY=VALUE`` overrides of the dsq autoround row
    seeds: tuple[int, ...] = (0,)  # every learned-rounding seed of the run
    calibration_data: Path | None = None  # quantize.calibration.data (None: the bundled calibration split)

    @property
    def scheme_name(self) -> str:
        """``int4-g128`` or ``int4-ch``."""
        return f"int4-g{self.group_size}" if self.group_size else "int4-ch"

    def weight_overrides(self) -> list[str]:
        """The ``quantize.weights`` keys of every dsq row."""
        if self.group_size == 0:
            return ["quantize.weights.bits=4", "quantize.weights.granularity=channel"]
        return ["quantize.weights.bits=4", "quantize.weights.granularity=group", f"quantize.weights.group_size={self.group_size}"]


@dataclass(frozen=True)
class Reference:
    """What every row shares: the fp32 score, the scorer's tokens, the calibration tokens and dsq's targets."""

    evaluator: Evaluator  # held-out tokens and window settings of the recipe's eval section
    fp32_ppl: float
    calibration: torch.Tensor  # (samples, seq_len) int64
    calibration_summary: dict
    targets: tuple[str, ...]  # modules dsq quantizes under the recipe's targets (Linears and fused experts)
    experts: tuple[str, ...]  # the fused MoE experts modules among them (3-D gate_up_proj / down_proj)

    def score(self, model: nn.Module) -> float:
        """Held-out perplexity of ``model`` with the recipe's window settings."""
        return score(self.evaluator, model)

    def increase_pct(self, ppl: float) -> float:
        return 100.0 * (ppl / self.fp32_ppl - 1.0)


@dataclass(frozen=True)
class Row:
    """One method's result."""

    method: str
    ppl: float
    ppl_increase_pct: float
    quantize_seconds: float
    kept: tuple[str, ...]  # targeted layers left in 16 bit
    note: str = ""  # how the row treated the targets, when it differs from dsq's in-place quantization
    details: dict = field(default_factory=dict)
    seed: int | None = None  # the learned-rounding seed, when the run asked for several

    @property
    def label(self) -> str:
        return self.method if self.seed is None else f"{self.method} (seed {self.seed})"


def score(evaluator: Evaluator, model: nn.Module) -> float:
    """Held-out perplexity of ``model`` on ``evaluator``'s tokens and window settings, as the pipeline's evaluator measures it."""
    model.eval()
    config = evaluator.suite.perplexity
    return perplexity(model, evaluator.token_ids, config, batch_size=evaluator.batch_size, progress=False).ppl


def base_overrides(settings: Settings) -> list[str]:
    """Recipe keys every dsq row and the scorer share (multiple choice and the reload check are not scored here)."""
    return [f"model={settings.model}", "progress=false", "overwrite=true", "eval.multiple_choice=null", "eval.reload_check=false"]


def method_overrides(method: str, settings: Settings) -> list[str]:
    """``quantize.*`` overrides of dsq method ``method`` (calibration keys only for sections that read them)."""
    overrides = [f"quantize.method={method}", *settings.weight_overrides()]
    if "calibration" in METHODS[method].section.model_fields:
        overrides += [f"quantize.calibration.samples={settings.samples}", f"quantize.calibration.seq_len={settings.seq_len}"]
        if settings.calibration_data is not None:
            overrides.append(f"quantize.calibration.data={settings.calibration_data}")
    if method == "autoround":
        # one calibration batch per step: the calibration section's batch_size
        overrides += [f"quantize.autoround.steps={settings.steps}", f"quantize.autoround.seed={settings.seed}",
                      f"quantize.calibration.batch_size={settings.batch_size}"]
        if settings.lr is not None:
            overrides.append(f"quantize.autoround.lr={settings.lr}")
        overrides += [f"quantize.autoround.{kv}" for kv in settings.autoround_set]
    return overrides


def prepare_reference(settings: Settings) -> Reference:
    """Load the fp32 model once: its score, dsq's targets in it, and the calibration tokens."""
    recipe = load_recipe(None, base_overrides(settings))
    loaded = load_checkpoint(validate_checkpoint(settings.model), dtype=torch.float32)
    data = None if settings.calibration_data is None else str(settings.calibration_data)
    spec = CalibrationSection(data=data, samples=settings.samples,
                              seq_len=settings.seq_len).spec()  # recipe defaults otherwise
    calibration, summary = load_calibration_with_summary(spec, loaded.tokenizer)
    evaluator = Evaluator(benchmark_suite(recipe.eval), loaded.tokenizer, progress=False)
    decisions = [d for d in select_targets(loaded.model, recipe.quantize.targets.spec()) if d.quantize]
    targets = tuple(d.name for d in decisions)
    experts = tuple(d.name for d in decisions if d.kind == "experts")
    return Reference(evaluator, score(evaluator, loaded.model), calibration, summary.to_dict(), targets, experts)


def run_dsq(method: str, settings: Settings, reference: Reference) -> Row:
    """One dsq method through the pipeline; its perplexity is the pipeline's own."""
    overrides = base_overrides(settings) + method_overrides(method, settings)
    name = load_recipe(None, overrides).quantize.row_name()  # gptq-int4-g128
    result = run(load_recipe(None, [*overrides, f"output={settings.out / name}"]))
    report = json.loads((result.output / "report.json").read_text())
    cand = report["candidates"][0]
    facts = cand["extra"]["quantization"]
    data = (facts.get("calibration") or {}).get("data")
    if data is not None and data != reference.calibration_summary:
        raise RuntimeError(f"{name}: the pipeline drew other calibration tokens ({data}) than the peer gets "
                           f"({reference.calibration_summary})")
    kept_names = {k["name"] for k in facts["kept"]}
    ppl = cand["ppl"]["ppl"]
    details = {"pipeline_fp32_ppl": report["original"]["ppl"]["ppl"], "artifact": str(result.output),
               "settings": report["meta"]["recipe"]["quantize"]}
    return Row(f"dsq {name}", ppl, reference.increase_pct(ppl), facts["seconds"],
               tuple(t for t in reference.targets if t in kept_names), details=details)


def _is_targeted(targets: tuple[str, ...]) -> Callable[[str], bool]:
    """Whether a module name is one of ``targets`` or inside one (AutoRound's per-expert Linears)."""
    return lambda name: any(name == t or name.startswith(t + ".") for t in targets)


@contextmanager
def _shape_skips_quantized(targeted: Callable[[str], bool]) -> Iterator[list[str]]:
    """Give the targeted Linears that AutoRound keeps in 16 bit for their shape the run's scheme back.

    Wraps ``apply_layer_config_special_cases``, which sets ``bits=16, data_type="fp"`` on every
    int weight-only Linear with an output or input width not a multiple of 32; layers already at
    16 bit before it (ignore_layers such as MoE routers) are left alone. Yields the names so restored.
    """
    from auto_round.compressors import layer_config_resolver as resolver
    from auto_round.utils import SUPPORTED_LAYER_TYPES

    original = resolver.apply_layer_config_special_cases
    restored: list[str] = []

    def special_cases(layer_config, model, default_dict, *args, **kwargs):
        already_fp = {name for name, cfg in layer_config.items() if cfg.get("bits", 16) >= 16}
        result = original(layer_config, model, default_dict, *args, **kwargs)
        for name, module in model.named_modules():
            cfg = result[0].get(name)
            shape_skipped = isinstance(module, SUPPORTED_LAYER_TYPES) and any(w % SHAPE_MULTIPLE for w in module.weight.shape[:2])
            if shape_skipped and targeted(name) and cfg is not None and cfg.get("bits") == 16 and name not in already_fp:
                cfg.update(bits=default_dict["bits"], data_type=default_dict["data_type"])
                if name not in restored:
                    restored.append(name)
        return result

    resolver.apply_layer_config_special_cases = special_cases
    try:
        yield restored
    finally:
        resolver.apply_layer_config_special_cases = original


def peer_kept(model: nn.Module, targets: tuple[str, ...]) -> tuple[str, ...]:
    """dsq's targets that AutoRound left in 16 bit: an unquantized Linear at or under a target, or a
    target with no Linear at all (a fused experts module AutoRound did not unfuse)."""
    from auto_round.utils import SUPPORTED_LAYER_TYPES, check_to_quantized

    linears = {n: m for n, m in model.named_modules() if isinstance(m, SUPPORTED_LAYER_TYPES)}
    kept: list[str] = []
    for target in targets:
        under = [n for n in linears if n == target or n.startswith(target + ".")]
        if not under:
            kept.append(f"{target} (not a Linear: left as is)")
        kept += [n for n in under if not check_to_quantized(linears[n])]
    return tuple(kept)


def unfused_experts(model: nn.Module, experts: tuple[str, ...]) -> dict[str, int]:
    """Per fused experts module of the original, how many Linears AutoRound's model holds in its place."""
    from auto_round.utils import SUPPORTED_LAYER_TYPES

    linears = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_LAYER_TYPES)]
    return {e: sum(n.startswith(e + ".") for n in linears) for e in experts}


def peer_note(unfused: dict[str, int], restored: list[str], shape_skips: bool) -> str:
    """What AutoRound did with the fused experts and with the Linears its shape rule keeps in 16 bit."""
    parts = []
    if unfused and min(unfused.values()) > 0:  # none: the kept column names them
        counts = "/".join(str(c) for c in sorted(set(unfused.values())))
        parts.append(f"{len(unfused)} fused experts modules unfused into {counts} nn.Linear each")
    if restored:
        parts.append(f"{len(restored)} Linears with a width not a multiple of {SHAPE_MULTIPLE}, which AutoRound keeps "
                     f"in 16 bit, quantized here")
    elif shape_skips:
        parts.append(f"AutoRound's rule: Linears with a width not a multiple of {SHAPE_MULTIPLE} kept in 16 bit")
    return "; ".join(parts)


def run_peer(settings: Settings, reference: Reference) -> Row:
    """AutoRound's SignRound on the fp32 model with the dsq calibration tokens; its model scored in memory."""
    from auto_round import AutoRound, SignRoundConfig
    from auto_round.schemes import QuantizationScheme

    loaded = load_checkpoint(validate_checkpoint(settings.model), dtype=torch.float32)
    config = SignRoundConfig(iters=settings.steps, lr=settings.lr)
    scheme = QuantizationScheme(bits=4, group_size=settings.group_size or -1, sym=True, data_type="int")
    batches = list(reference.calibration.split(settings.batch_size))  # [(batch, seq_len)] token ids
    started = time.perf_counter()
    shape_rule = nullcontext([]) if settings.peer_shape_skips else _shape_skips_quantized(_is_targeted(reference.targets))
    with shape_rule as restored:
        rounder = AutoRound(
            loaded.model, tokenizer=loaded.tokenizer, scheme=scheme, alg_configs=config, dataset=batches,
            nsamples=settings.samples, seqlen=settings.seq_len, batch_size=settings.batch_size, seed=settings.seed,
            device_map="cpu", amp=False, low_cpu_mem_usage=False, enable_torch_compile=False,
        )
        model, _ = rounder.quantize()
    seconds = time.perf_counter() - started
    ppl = reference.score(model)
    details = {"package": f"{PEER_PACKAGE} {importlib.metadata.version(PEER_PACKAGE)}", "algorithm": "SignRound",
               "iters": config.iters, "lr": config.compute_lr(4), "batch_size": settings.batch_size,
               "nsamples": settings.samples, "seqlen": settings.seq_len, "seed": settings.seed, "amp": False,
               "enable_minmax_tuning": config.enable_minmax_tuning, "group_size": scheme.group_size,
               "shape_skips_quantized": list(restored), "experts_unfused": unfused_experts(model, reference.experts)}
    note = peer_note(details["experts_unfused"], restored, settings.peer_shape_skips)
    return Row(f"{PEER_PACKAGE} SignRound {settings.scheme_name}", ppl, reference.increase_pct(ppl), seconds,
               peer_kept(model, reference.targets), note, details)


def versions() -> dict[str, str]:
    """torch, transformers and auto-round versions (``not installed`` for a missing one)."""
    out = {}
    for package in ("torch", "transformers", PEER_PACKAGE):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def header(settings: Settings, reference: Reference) -> list[str]:
    """The lines above the table: machine, versions, format, data and scorer."""
    machine = machine_info()
    flags = " ".join(avx512_flags()) or "none"
    ev = reference.evaluator
    ppl = ev.suite.perplexity
    cal = reference.calibration_summary
    digest = hashlib.sha256(reference.calibration.numpy().tobytes()).hexdigest()[:16]
    return [
        f"CPU: {machine['cpu']}, {machine['usable_cores']} usable cores, {machine['torch_threads']} torch threads; avx512: {flags}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        (f"model: {settings.model}; symmetric {settings.scheme_name}; steps {settings.steps}, batch {settings.batch_size}, "
         f"lr {settings.lr if settings.lr is not None else 'each method default'}, "
         f"seed{'s' if len(settings.seeds) > 1 else ''} {' '.join(map(str, settings.seeds))}"),
        (f"calibration (every row): {cal['samples']} x {cal['seq_len']} tokens from {cal['source']} (seed {cal['seed']}, "
         f"sha256 {digest})"),
        f"perplexity (every row): {ev.suite.text_path}, {ev.token_ids.numel()} tokens, context {ppl.context}, stride {ppl.stride}",
        "kept in 16 bit: layers dsq targets that the row did not quantize (lm_head and MoE routers stay in 16 bit in every row)",
    ]


def kept_cell(row: Row) -> str:
    """``none`` or ``count: names``, then the row's note in parentheses."""
    cell = f"{len(row.kept)}: " + ", ".join(row.kept) if row.kept else "none"
    return f"{cell} ({row.note})" if row.note else cell


def table(reference: Reference, rows: list[Row]) -> list[str]:
    """The Markdown table: fp32 first, then the rows in run order."""
    lines = ["| method | ppl | Δppl % vs fp32 | quantize s | kept in 16 bit |", "|---|---|---|---|---|",
             f"| fp32 (original) | {reference.fp32_ppl:.3f} | 0.00 | - | - |"]
    for row in rows:
        lines.append(f"| {row.label} | {row.ppl:.3f} | {row.ppl_increase_pct:+.2f} | {row.quantize_seconds:.1f} | "
                     f"{kept_cell(row)} |")
    return lines


def write_json(path: Path, settings: Settings, reference: Reference, rows: list[Row], head: list[str]) -> None:
    ev = reference.evaluator
    record = {
        "header": head,
        "machine": {**machine_info(), "avx512": avx512_flags()},
        "versions": versions(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "calibration": {**reference.calibration_summary,
                        "sha256": hashlib.sha256(reference.calibration.numpy().tobytes()).hexdigest()},
        "perplexity": {"text": str(ev.suite.text_path), "tokens": ev.token_ids.numel(), **asdict(ev.suite.perplexity)},
        "fp32_ppl": reference.fp32_ppl,
        "targets": list(reference.targets),
        "rows": [asdict(row) for row in rows],
        "over_seeds": [{**asdict(summary), "mean": summary.mean} for summary in seed_summaries(rows)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def parse_args() -> tuple[Settings, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="HF checkpoint directory (default: the bundled tiny DeepSeek-V3)")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size; 0: one scale per output channel")
    parser.add_argument("--samples", type=int, default=128, help="calibration sequences")
    parser.add_argument("--calibration-data", type=Path, default=None,
                        help="calibration text for every row (quantize.calibration.data; default: the bundled calibration split)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    parser.add_argument("--steps", type=int, default=200, help="learned-rounding steps per block (dsq autoround, peer)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per learned-rounding step (dsq autoround, peer)")
    parser.add_argument("--lr", type=float, default=None, help="learned-rounding step size (default: each method's own)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="learned-rounding seeds: dsq autoround and peer run once per seed")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"any of {' '.join(DSQ_METHODS)} {PEER} (default: every registered dsq method, then {PEER})")
    parser.add_argument("--peer-shape-skips", action="store_true",
                        help="let AutoRound keep in 16 bit the Linears whose widths are not multiples of 32 (default: quantize them)")
    parser.add_argument("--autoround-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra quantize.autoround settings of the dsq autoround row (e.g. gptq_init=true)")
    parser.add_argument("--out", type=Path, default=Path("runs/lr"), help="where the JSON and the dsq artifacts go")
    args = parser.parse_args()
    if args.group_size < 0 or args.group_size == 1:
        parser.error(f"--group-size must be 0 (per channel) or at least 2, got {args.group_size}")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must differ from each other, got {' '.join(map(str, args.seeds))}")
    methods = args.methods or [m for m in DSQ_METHODS if m in METHODS] + [PEER]
    unknown = [m for m in methods if m != PEER and (m not in DSQ_METHODS or m not in METHODS)]
    if unknown:
        registered = " ".join(m for m in DSQ_METHODS if m in METHODS)
        parser.error(f"--methods: {' '.join(unknown)} not available (registered int4 methods here: {registered}; and {PEER})")
    if PEER in methods and versions()[PEER_PACKAGE] == "not installed":
        parser.error(f"{PEER} needs the {PEER_PACKAGE} package: pip install 'dsq[peers]'")
    model = args.model if args.model is not None else bundled_model_path()
    settings = Settings(model, args.group_size, args.samples, args.seq_len, args.steps, args.batch_size, args.lr,
                        args.seeds[0], args.out, args.peer_shape_skips, tuple(args.autoround_set), tuple(args.seeds),
                        args.calibration_data)
    return settings, methods


SEEDED = ("autoround", PEER)  # the methods whose result depends on the learned-rounding seed


def run_method(method: str, settings: Settings, reference: Reference) -> Iterator[Row]:
    """``method``'s rows as they finish: one, or one per seed for a seeded method when several seeds are asked for."""
    def run(s: Settings) -> Row:
        return run_peer(s, reference) if method == PEER else run_dsq(method, s, reference)

    if method not in SEEDED or len(settings.seeds) == 1:
        yield run(settings)
        return
    for seed in settings.seeds:
        yield replace(run(replace(settings, seed=seed, out=settings.out / f"seed{seed}")), seed=seed)


@dataclass(frozen=True)
class SeedSummary:
    """A seeded method's results over the seeds."""

    method: str
    increases: tuple[float, ...]  # Δppl % per seed
    seconds: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.increases) / len(self.increases)


def seed_summaries(rows: list[Row]) -> list[SeedSummary]:
    """The rows of each seeded method, grouped by method."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        if row.seed is not None:
            groups.setdefault(row.method, []).append(row)
    return [SeedSummary(name, tuple(r.ppl_increase_pct for r in rs), tuple(r.quantize_seconds for r in rs))
            for name, rs in groups.items()]


def summary_table(rows: list[Row], summaries: list[SeedSummary]) -> list[str]:
    """Mean and range over the seeds, and the mean as a multiple of GPTQ's increase (when GPTQ ran)."""
    gptq = next((r.ppl_increase_pct for r in rows if r.method.startswith("dsq gptq-")), None)
    lines = ["| method | seeds | mean Δppl % | range | mean quantize s | mean / GPTQ's increase |", "|---|---|---|---|---|---|"]
    for s in summaries:
        ratio = f"{s.mean / gptq:.2f}x" if gptq else "-"
        lines.append(f"| {s.method} | {len(s.increases)} | {s.mean:+.2f} | {min(s.increases):+.2f} .. {max(s.increases):+.2f} | "
                     f"{sum(s.seconds) / len(s.seconds):.1f} | {ratio} |")
    return lines


def main() -> None:
    settings, methods = parse_args()
    reference = prepare_reference(settings)
    rows = []
    for method in methods:
        for row in run_method(method, settings, reference):
            rows.append(row)
            print(table(reference, rows)[-1], flush=True)
    head = header(settings, reference)
    print("\n" + "\n".join(head) + "\n")
    print("\n".join(table(reference, rows)))
    summaries = seed_summaries(rows)
    if summaries:
        print("\nover the seeds:\n\n" + "\n".join(summary_table(rows, summaries)))
    path = settings.out / "learned_rounding.json"
    write_json(path, settings, reference, rows, head)
    print(f"\nrows written to {path}")


if __name__ == "__main__":
    main()
