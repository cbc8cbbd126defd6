"""``dsq search RECIPE``: the smallest artifact that passes the recipe's gates, with per-module schemes.

1. Sensitivity: every module the recipe targets is quantized alone at each candidate scheme (round to
   nearest) and the model's KL against the original is measured on a few windows
   (:mod:`dsq.quantize.sensitivity`).
2. Allocation: a path of per-module allocations from every module at its smallest candidate to the most
   accurate, in order of KL removed per byte (:mod:`dsq.quantize.allocation`).
3. Verification: points of the path are run end to end with the recipe's own method, evaluation and gates
   (each a normal ``dsq run`` of the recipe with one ``quantize.targets.schemes`` rule per module). A binary
   search finds the smallest point that passes (``search.max_bytes`` unset) or the most accurate one within
   the byte budget; with ``search.references`` the uniform allocations (every module at one candidate) are
   verified too. Only a verified point that passed every gate is returned: the path is not assumed to be
   monotone, the verdict is the run's.

The output directory then holds the chosen run's artifact (its recipe lists every module's scheme) plus
``search.json``, ``search.md`` (the table of every verified point: size, accuracy, gates, Pareto front),
``pareto.png`` and ``search_recipe.yaml`` (the recipe that rebuilds the artifact with ``dsq run``). When
no point passes, only the search files are written and the command exits 1. Trials are run without the
recipe's ``export`` section: export the result with ``dsq export``.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsq.core.atomic import atomic_directory
from dsq.core.errors import RecipeError
from dsq.core.loading import load_checkpoint
from dsq.core.manifest import MANIFEST, extend_manifest
from dsq.eval.gates import ppl_increase_pct
from dsq.quantize.allocation import Allocation, allocation_path, uniform
from dsq.quantize.calibration_data import load_calibration
from dsq.quantize.method import method_names, method_of
from dsq.quantize.scheme import KEEP, parse_scheme_or_keep
from dsq.quantize.sections import SchemeRuleSection
from dsq.quantize.sensitivity import Candidate, SensitivityTable, measure_sensitivity
from dsq.quantize.targets import select_targets
from dsq.run.recipe import Recipe, dump_recipe
from dsq.run.steps import DTYPES, model_path

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"
SEARCH_FILES = (SEARCH_FILE, "search.md", "pareto.png", "search_recipe.yaml")


@dataclass
class SearchPoint:
    """One verified allocation: what the end-to-end run measured and whether its gates passed."""

    name: str  # "path 7/23", "all int8-ch"
    allocation: Allocation
    recipe: Recipe
    weight_bytes: int
    ppl_increase_pct: float | None
    mean_kl: float | None
    top1: float | None
    passed: bool
    failed: list[str]
    seconds: float
    trial: Path

    def to_dict(self) -> dict:
        return {
            "name": self.name, "schemes": self.allocation.counts(), "predicted_bytes": self.allocation.bytes,
            "predicted_kl": self.allocation.kl, "weight_bytes": self.weight_bytes, "ppl_increase_pct": self.ppl_increase_pct,
            "mean_kl": self.mean_kl, "top1_agreement": self.top1, "passed": self.passed, "failed_gates": self.failed,
            "seconds": round(self.seconds, 2), "modules": self.allocation.as_dict(),
        }


@dataclass
class SearchResult:
    """What ``dsq search`` found: the verified points, the chosen one (None: none passed) and where it is."""

    output: Path
    table: SensitivityTable
    path_length: int
    points: list[SearchPoint] = field(default_factory=list)
    chosen: SearchPoint | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.chosen is not None


def _check(recipe: Recipe) -> None:
    """Refuse recipes the search cannot run, naming the key."""
    if recipe.search is None:
        raise RecipeError("search: the recipe has no search section (candidates, max_bytes, ...)")
    if recipe.quantize is None or recipe.finetune is not None:
        raise RecipeError("search: needs a quantize section and no finetune section")
    config = recipe.quantize.config(DTYPES[recipe.dtype])
    if not method_of(config).mixed_schemes:
        raise RecipeError(f"search: quantize.method {recipe.quantize.method!r} has one scheme for every module; "
                          f"methods the search can drive: {', '.join(method_names(lambda m: m.mixed_schemes))}")
    if not any(v is not None for v in recipe.eval.gates.model_dump().values()):
        raise RecipeError("search: eval.gates sets no gate; the search looks for the smallest artifact that passes them")
    if recipe.streaming:
        raise RecipeError("search: measuring sensitivities needs the whole model in memory; set streaming: false")


def _candidates(recipe: Recipe) -> list[Candidate]:
    return [Candidate(parse_scheme_or_keep(label)) for label in recipe.search.candidates]


def _sensitivities(recipe: Recipe, progress: bool) -> SensitivityTable:
    loaded = load_checkpoint(model_path(recipe), dtype=DTYPES[recipe.dtype], trust_remote_code=recipe.trust_remote_code)
    config = recipe.quantize.config(DTYPES[recipe.dtype])
    decisions = select_targets(loaded.model, config.targets)
    tokens = load_calibration(recipe.search.calibration.spec(), loaded.tokenizer)
    dtype_bytes = torch.finfo(DTYPES[recipe.dtype]).bits // 8
    return measure_sensitivity(loaded.model, decisions, _candidates(recipe), tokens,
                               batch_size=recipe.search.calibration.batch_size, dtype_bytes=dtype_bytes, progress=progress)


def trial_recipe(recipe: Recipe, allocation: Allocation, output: Path) -> Recipe:
    """``recipe`` with one exact-name scheme rule per module of ``allocation`` (before the recipe's own rules),
    written to ``output``, without its search and export sections."""
    quantize = recipe.quantize
    rules = [SchemeRuleSection(pattern=f"^{re.escape(name)}$", scheme=label) for name, label in allocation.labels]
    targets = quantize.targets.model_copy(update={"schemes": rules + list(quantize.targets.schemes)})
    return recipe.model_copy(update={
        "output": str(output), "overwrite": False, "search": None, "export": None,
        "quantize": quantize.model_copy(update={"targets": targets}),
    })


class _Verifier:
    """Runs allocations end to end (at most ``limit`` times) and keeps every point."""

    def __init__(self, recipe: Recipe, root: Path, limit: int) -> None:
        self.recipe, self.root, self.limit = recipe, root, limit
        self.points: list[SearchPoint] = []
        self._by_labels: dict[tuple, SearchPoint] = {}

    @property
    def exhausted(self) -> bool:
        return len(self.points) >= self.limit

    def __call__(self, allocation: Allocation, name: str) -> SearchPoint:
        from dsq.run.pipeline import run

        if allocation.labels in self._by_labels:
            return self._by_labels[allocation.labels]
        trial = self.root / f"trial-{len(self.points)}"
        recipe = trial_recipe(self.recipe, allocation, trial)
        started = time.perf_counter()
        result = run(recipe)
        point = _point(name, allocation, recipe, result, time.perf_counter() - started, trial)
        self.points.append(point)
        self._by_labels[allocation.labels] = point
        verdict = "PASS" if point.passed else "FAIL (" + "; ".join(point.failed) + ")"
        log.info("search %s: %.3f MiB weights, %s", name, point.weight_bytes / 2**20, verdict)
        return point


def _point(name: str, allocation: Allocation, recipe: Recipe, result, seconds: float, trial: Path) -> SearchPoint:
    if result.report is None:  # a streamed run of a model too large to evaluate here
        raise RecipeError(f"search: the run of {name} was not evaluated (the model does not fit in memory here), "
                          "so its gates cannot be checked")
    original, candidate = result.report.original, result.report.candidates[0]
    fidelity = candidate.fidelity
    return SearchPoint(
        name, allocation, recipe, int(candidate.weight_bytes_disk or 0), ppl_increase_pct(original, candidate),
        fidelity.mean_kl if fidelity is not None else None, fidelity.top1_agreement if fidelity is not None else None,
        result.gates_passed, [g.message for g in result.gates if not g.passed], seconds, trial,
    )


def _smallest_passing(verify: _Verifier, path: list[Allocation]) -> None:
    """Binary search for the first passing point of ``path`` among those predicted smaller than every passing
    point verified so far (the uniform references)."""
    n = len(path)
    ceiling = min((p.allocation.bytes for p in verify.points if p.passed), default=None)
    lo, hi = 0, max((i for i, a in enumerate(path) if ceiling is None or a.bytes < ceiling), default=-1)
    while lo <= hi and not verify.exhausted:
        mid = (lo + hi) // 2
        if verify(path[mid], f"path {mid}/{n - 1}").passed:
            hi = mid - 1
        else:
            lo = mid + 1


def _untargeted_bytes(verify: _Verifier, path: list[Allocation]) -> int:
    """Weight bytes on disk outside the allocated modules (embeddings, norms, router, kept lm_head), from a
    verified point (the first of ``path`` when none is verified yet)."""
    point = verify.points[0] if verify.points else verify(path[0], f"path 0/{len(path) - 1}")
    return point.weight_bytes - point.allocation.bytes


def _best_under_budget(verify: _Verifier, path: list[Allocation], budget: int) -> None:
    """The most accurate point of ``path`` whose verified weight bytes fit ``budget`` (stepping down)."""
    n = len(path)
    rest = _untargeted_bytes(verify, path)
    index = max((i for i, a in enumerate(path) if a.bytes + rest <= budget), default=None)
    while index is not None and index >= 0 and not verify.exhausted:
        if verify(path[index], f"path {index}/{n - 1}").weight_bytes <= budget:
            return
        index -= 1


def _choose(points: list[SearchPoint], budget: int | None) -> SearchPoint | None:
    """The smallest passing point (or, under a budget, the passing point within it with the lowest KL)."""
    passing = [p for p in points if p.passed and (budget is None or p.weight_bytes <= budget)]
    if not passing:
        return None
    if budget is None:
        return min(passing, key=lambda p: (p.weight_bytes, p.mean_kl or 0.0))
    return min(passing, key=lambda p: (p.mean_kl if p.mean_kl is not None else float("inf"), p.weight_bytes))


def run_search(recipe: Recipe) -> SearchResult:
    """Run ``recipe``'s search (see the module docstring); the output directory is written atomically.

    Raises:
        RecipeError: the recipe cannot be searched (no gates, a one-scheme method, no search section, ...).
    """
    _check(recipe)
    search = recipe.search
    output = Path(recipe.output).expanduser()
    table = _sensitivities(recipe, recipe.progress)
    path = [a for a in allocation_path(table) if set(a.as_dict().values()) != {KEEP}]  # all kept: the original
    result = SearchResult(output, table, len(path))
    with atomic_directory(output, recipe.overwrite, marker=SEARCH_FILE) as tmp:
        verify = _Verifier(recipe, tmp / "trials", search.max_trials)
        if search.references:
            for label in search.candidates:
                if label != KEEP and not verify.exhausted:
                    verify(uniform(table, label), f"all {label}")
        if not verify.exhausted:
            if search.max_bytes is None:
                _smallest_passing(verify, path)
            else:
                _best_under_budget(verify, path, search.max_bytes)
        if verify.exhausted:
            result.notes.append(f"stopped at search.max_trials = {search.max_trials} verified runs")
        result.points, result.chosen = verify.points, _choose(verify.points, search.max_bytes)
        _write(tmp, recipe, result)
    return result


def _write(tmp: Path, recipe: Recipe, result: SearchResult) -> None:
    """Move the chosen run into ``tmp``, drop the other trials, write the search files."""
    chosen = result.chosen
    if chosen is not None:
        for item in chosen.trial.iterdir():
            item.rename(tmp / item.name)
        rebuild = chosen.recipe.model_copy(update={"output": str(result.output), "overwrite": recipe.overwrite})
        (tmp / "search_recipe.yaml").write_text(dump_recipe(rebuild))
    shutil.rmtree(tmp / "trials")
    (tmp / "search.md").write_text(search_markdown(result))
    written = ["search.md"] + (["search_recipe.yaml"] if chosen is not None else [])
    png = pareto_png(result)
    if png is not None:
        (tmp / "pareto.png").write_bytes(png)
        written.append("pareto.png")
    (tmp / SEARCH_FILE).write_text(json.dumps(search_record(result), indent=2) + "\n")
    written.append(SEARCH_FILE)
    if chosen is not None and (tmp / MANIFEST).is_file():
        extend_manifest(tmp, written)


def pareto_front(points: list[SearchPoint]) -> set[str]:
    """Names of the points no other point beats on both weight bytes and mean KL."""
    scored = [p for p in points if p.mean_kl is not None]
    return {p.name for p in scored
            if not any(q.weight_bytes <= p.weight_bytes and q.mean_kl <= p.mean_kl and (q.weight_bytes, q.mean_kl) != (p.weight_bytes, p.mean_kl)
                       for q in scored)}


def search_record(result: SearchResult) -> dict:
    front = pareto_front(result.points)
    return {
        "chosen": result.chosen.name if result.chosen else None,
        "path_length": result.path_length,
        "sensitivity": result.table.to_dict(),
        "points": [{**p.to_dict(), "pareto": p.name in front} for p in result.points],
        "notes": result.notes,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def search_markdown(result: SearchResult) -> str:
    """The table of every verified point, smallest first."""
    front = pareto_front(result.points)
    lines = [
        "# dsq search", "",
        f"Sensitivities: {len(result.table.modules)} modules x {len(result.table.candidates)} candidates "
        f"({', '.join(result.table.candidates)}), {result.table.tokens} tokens, {result.table.seconds:.1f} s. "
        f"Allocation path: {result.path_length} points. Verified runs: {len(result.points)}.", "",
        "| point | schemes (modules) | predicted MiB (allocated modules) | weights MiB | Δppl % | mean KL | top-1 | gates | Pareto | chosen |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in sorted(result.points, key=lambda p: p.weight_bytes):
        counts = ", ".join(f"{label} {n}" for label, n in sorted(p.allocation.counts().items()))
        lines.append(
            f"| {p.name} | {counts} | {p.allocation.bytes / 2**20:.3f} | {p.weight_bytes / 2**20:.3f} | "
            f"{_fmt(p.ppl_increase_pct, '+.3f')} | {_fmt(p.mean_kl, '.5f')} | {_fmt(p.top1, '.4f')} | "
            f"{'pass' if p.passed else 'FAIL'} | {'yes' if p.name in front else ''} | {'**yes**' if p is result.chosen else ''} |"
        )
    lines.append("")
    if result.chosen is None:
        lines.append("No verified point passed the gates: nothing was chosen and no artifact was written.")
    else:
        lines.append(f"Chosen: {result.chosen.name}, {result.chosen.weight_bytes / 2**20:.3f} MiB of weights; "
                     "every module's scheme is in recipe.yaml (quantize.targets.schemes).")
    lines += [f"Note: {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def pareto_png(result: SearchResult) -> bytes | None:
    """Weight MiB against mean KL of every verified point (passing filled, failing hollow); None without points."""
    from dsq.eval.plot_common import new_figure, png_bytes

    scored = [p for p in result.points if p.mean_kl is not None]
    if not scored:
        return None
    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for passed, style in ((True, {"color": "tab:green"}), (False, {"facecolors": "none", "edgecolors": "tab:red"})):
        group = [p for p in scored if p.passed is passed]
        ax.scatter([p.weight_bytes / 2**20 for p in group], [p.mean_kl for p in group], label="passes" if passed else "fails", **style)
    for p in scored:
        ax.annotate(p.name, (p.weight_bytes / 2**20, p.mean_kl), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("quantized weights on disk (MiB)")
    ax.set_ylabel("mean KL vs original (nats/token)")
    ax.set_title("dsq search: verified points")
    ax.legend()
    return png_bytes(fig)
