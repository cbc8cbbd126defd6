"""dsq search: measured sensitivities, the allocation path, and verified mixed-precision artifacts."""
from __future__ import annotations

import json

import pytest
import torch

from dsq.cli import main
from dsq.core.errors import RecipeError
from dsq.core.loading import load_checkpoint
from dsq.core.manifest import verify_manifest
from dsq.quantize.allocation import allocation_path, uniform
from dsq.quantize.scheme import PerChannel, PerGroup, WeightScheme
from dsq.quantize.sensitivity import Candidate, fake_quantized, measure_sensitivity
from dsq.quantize.targets import TargetSpec, select_targets
from dsq.run.recipe import load_recipe
from dsq.run.search import run_search

CANDIDATES = [Candidate(WeightScheme(4, PerGroup(32))), Candidate(WeightScheme(8, PerChannel())), Candidate(None)]
FAST_EVAL = ["eval.multiple_choice=null", "eval.perplexity.max_tokens=1024", "eval.fidelity.max_tokens=512",
             "eval.reload_check=false", "search.calibration.samples=4", "search.calibration.seq_len=64"]


@pytest.fixture(scope="module")
def sensitivity(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint("deepseek_v3")).model
    decisions = select_targets(model, TargetSpec())
    calib = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    return model, decisions, measure_sensitivity(model, decisions, CANDIDATES, calib, batch_size=2, progress=False)


def test_fake_quantizing_one_module_is_undone_exactly(sensitivity):
    model, decisions, _ = sensitivity
    experts = next(d for d in decisions if d.kind == "experts")
    before = experts.module.gate_up_proj.detach().clone()
    with fake_quantized(experts, WeightScheme(4, PerGroup(32))):
        assert not torch.equal(experts.module.gate_up_proj, before)
    assert torch.equal(experts.module.gate_up_proj, before)


def test_every_module_is_measured_at_every_candidate(sensitivity):
    _, decisions, table = sensitivity
    assert [m.name for m in table.modules] == [d.name for d in decisions if d.quantize]
    assert any(m.kind == "experts" for m in table.modules)  # a layer's routed experts are one group
    for m in table.modules:
        assert m.kl["keep"] == 0.0 and m.kl["int4-g32"] > 0 and m.kl["int8-ch"] > 0
        assert m.bytes["int4-g32"] < m.bytes["int8-ch"] < m.bytes["keep"]
    assert sum(m.kl["int8-ch"] for m in table.modules) < sum(m.kl["int4-g32"] for m in table.modules)


def test_the_allocation_path_runs_from_the_smallest_to_the_most_accurate(sensitivity):
    _, _, table = sensitivity
    path = allocation_path(table)
    assert path[0] == uniform(table, "int4-g32")
    assert all(b.kl < a.kl for a, b in zip(path, path[1:]))  # every step removes predicted KL
    assert path[-1].kl == 0.0  # ends with no upgrade left: every module kept
    for a, b in zip(path, path[1:]):  # one module changes per step
        assert sum(x != y for x, y in zip(a.labels, b.labels)) == 1


def _search(checkpoint, out, *extra: str) -> list[str]:
    return ["search", "recipes/search_demo.yaml", f"model={checkpoint}", f"output={out}", *FAST_EVAL,
            "search.candidates=[int4-g32, int8-ch, keep]", "search.max_trials=6", "quantize.weights.group_size=32", *extra, "-q"]


def test_search_returns_only_a_verified_passing_artifact(tiny_checkpoint, tmp_path, capsys):
    ckpt = tiny_checkpoint("deepseek_v3")
    loose = tmp_path / "loose"
    assert main(_search(ckpt, loose, "eval.gates={max_mean_kl: 10.0}")) == 0
    record = json.loads((loose / "search.json").read_text())
    points = {p["name"]: p for p in record["points"]}
    assert record["chosen"] == "all int4-g32"  # everything passes: the smallest allocation wins
    int4, int8 = points["all int4-g32"], points["all int8-ch"]
    assert int4["weight_bytes"] < int8["weight_bytes"] and int8["mean_kl"] < int4["mean_kl"]

    budget = (int4["weight_bytes"] + int8["weight_bytes"]) // 2  # the most accurate artifact within a byte budget
    within = tmp_path / "within"
    assert main(_search(ckpt, within, "eval.gates={max_mean_kl: 10.0}", f"search.max_bytes={budget}")) == 0
    record = json.loads((within / "search.json").read_text())
    fitting = [p for p in record["points"] if p["weight_bytes"] <= budget]
    chosen = next(p for p in record["points"] if p["name"] == record["chosen"])
    assert chosen["weight_bytes"] <= budget and chosen["mean_kl"] == min(p["mean_kl"] for p in fitting)
    assert chosen["name"].startswith("path") and chosen["mean_kl"] < int4["mean_kl"]

    threshold = (int4["mean_kl"] * int8["mean_kl"]) ** 0.5  # between the two uniform points
    tight = tmp_path / "tight"
    code = main(_search(ckpt, tight, f"eval.gates={{max_mean_kl: {threshold}}}"))
    printed = capsys.readouterr()
    assert code == 0, printed.err
    record = json.loads((tight / "search.json").read_text())
    points = {p["name"]: p for p in record["points"]}
    chosen = points[record["chosen"]]
    assert chosen["passed"] and chosen["mean_kl"] <= threshold
    assert not points["all int4-g32"]["passed"] and points["all int8-ch"]["passed"]
    assert chosen["weight_bytes"] <= points["all int8-ch"]["weight_bytes"]
    for p in points.values():  # each verdict is the run's own gate
        assert p["passed"] == (p["mean_kl"] <= threshold)
    assert chosen["weight_bytes"] == min(p["weight_bytes"] for p in points.values() if p["passed"])
    assert verify_manifest(tight).passed  # the chosen run's artifact, search files included in its manifest
    rebuilt = load_recipe(tight / "search_recipe.yaml")
    rules = {r.pattern: r.scheme for r in rebuilt.quantize.targets.schemes}
    assert len(rules) == len(chosen["modules"]) and set(rules.values()) <= {"int4-g32", "int8-ch", "keep"}
    assert (tight / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "| all int8-ch |" in (tight / "search.md").read_text()
    # re-checking the artifact in CI with its recipe's gate passes
    assert main(["validate", str(tight), "--baseline", str(ckpt), "-o", str(tmp_path / "ci"), "-q"]) == 0


def test_no_passing_allocation_exits_1_and_writes_no_artifact(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "none"
    code = main(_search(tiny_checkpoint("deepseek_v3"), out, "eval.gates={max_mean_kl: 0.0}", "search.max_trials=3",
                        "search.candidates=[int4-g32, int8-ch]"))
    printed = capsys.readouterr()
    assert code == 1 and "no verified allocation passed" in printed.err
    record = json.loads((out / "search.json").read_text())
    assert record["chosen"] is None and all(not p["passed"] for p in record["points"])
    assert not (out / "manifest.json").exists() and not list(out.glob("*.safetensors"))


@pytest.mark.parametrize("overrides, message", [
    (["eval.gates={}"], "eval.gates sets no gate"),
    (["quantize.method=awq"], "has one scheme for every module"),
    (["search.candidates=[int4-g32, int4-g32]"], "search.candidates"),
    (["search.candidates=[int4-g7x]"], "search.candidates"),
])
def test_a_recipe_the_search_cannot_run_exits_2(tiny_checkpoint, tmp_path, capsys, overrides, message):
    code = main(_search(tiny_checkpoint("deepseek_v3"), tmp_path / "out", *overrides))
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_dsq_run_refuses_a_search_recipe():
    from dsq.run.pipeline import run

    with pytest.raises(RecipeError, match="dsq search"):
        run(load_recipe("recipes/search_demo.yaml"))
