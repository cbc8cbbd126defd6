"""Tied input/output embeddings (``tie_word_embeddings: true``) through run, streaming, bnb, QAT, LoRA, export and plan.

An fp ``lm_head`` tied to the embedding is written once, under the embedding's name, and config.json keeps the
tie; a quantized ``lm_head`` is written beside the fp embedding and config.json drops the tie.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsq.cli import main
from dsq.quantize.artifact_load import load_artifact
from dsq.tools.plan import plan_checkpoint
from dsq.run.recipe import load_recipe
from dsq.tools.testing import make_tiny_checkpoint, tensor_data_bytes

ROOT = Path(__file__).resolve().parents[1]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
HELD_OUT = "def add(a, b):\n    return a + b\n\n" * 40
FINETUNE = ["finetune.training.max_steps=2", "finetune.training.batch_size=2", "finetune.training.save_every=2",
            "finetune.data.seq_len=64"]

# (case id, recipe overrides, lm_head quantized)
RUNS = [
    ("rtn-int8", ["quantize.weights.bits=8", "quantize.weights.group_size=32"], False),
    pytest.param("rtn-int4-asym-g32", ["quantize.weights.bits=4", "quantize.weights.group_size=32", "quantize.weights.symmetric=false"],
                 False, marks=pytest.mark.slow),
    ("rtn-int4-g32-lm_head", ["quantize.weights.bits=4", "quantize.weights.group_size=32", "quantize.targets.lm_head=true"], True),
    pytest.param("gptq-int4-g32", ["quantize.method=gptq", "quantize.weights.bits=4", "quantize.weights.group_size=32",
                                   "quantize.calibration.samples=4", "quantize.calibration.seq_len=64"], False, marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """``get(model_type) -> Path``: a tiny tied checkpoint, made once."""
    made: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in made:
            made[model_type] = make_tiny_checkpoint(model_type, tmp_path_factory.mktemp(model_type), tie_word_embeddings=True)
        return made[model_type]

    return get


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "held.txt").write_text(HELD_OUT)
    (root / "mc.jsonl").write_text("".join(
        json.dumps({"context": "def add(a, b):\n", "choices": ["    return a + b\n", " zzz"], "gold": 0}) + "\n" for _ in range(3)
    ))
    return root


def _eval(data: Path) -> list[str]:
    return [f"eval.perplexity.data={data / 'held.txt'}", "eval.perplexity.context=64", "eval.perplexity.stride=32",
            f"eval.multiple_choice.data={data / 'mc.jsonl'}", "eval.fidelity.seq_len=32", "eval.fidelity.max_tokens=128",
            "eval.gates.max_ppl_increase_pct=null", "eval.gates.min_top1_agreement=null", "progress=false"]


def _run(recipe: str, model: Path, out: Path, data: Path, *overrides: str) -> tuple[int, dict, dict, dict]:
    code = main(["run", str(ROOT / "recipes" / recipe), f"model={model}", f"output={out}", *_eval(data), *overrides, "-q"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    report = json.loads((out / "report.json").read_text())
    return code, config, report, load_file(str(out / "model.safetensors"))


def _check_tie(config: dict, tensors: dict, quantized_head: bool) -> None:
    assert config["tie_word_embeddings"] is (not quantized_head)
    assert EMBED in tensors and tensors[EMBED].dtype == torch.float32
    if quantized_head:
        assert "lm_head.weight_scale" in tensors and (HEAD not in tensors or not tensors[HEAD].is_floating_point())
    else:
        assert not [k for k in tensors if k.startswith("lm_head.")]  # the shared tensor is written once


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("case, overrides, quantized_head", RUNS, ids=["rtn-int8", "rtn-int4-asym-g32", "rtn-int4-g32-lm_head", "gptq-int4-g32"])
def test_run_writes_a_tied_artifact_that_reloads(tmp_path, tied, data, model_type, case, overrides, quantized_head, capsys):
    out = tmp_path / "out"
    _, config, report, tensors = _run("demo.yaml", tied(model_type), out, data, *overrides)
    candidate = report["candidates"][0]
    assert candidate["extra"]["reload_check"]["passed"] is True, capsys.readouterr().err
    _check_tie(config, tensors, quantized_head)
    assert any("tie_word_embeddings: false" in n for n in candidate["extra"]["quantization"]["notes"]) is quantized_head
    # dsq's own reader: the tie back where it was, the logits the run measured
    model = load_artifact(out).model
    assert (model.lm_head.weight is model.model.embed_tokens.weight) if not quantized_head else not hasattr(model.lm_head, "weight")
    # the plan predicts the bytes written, tied tensors once
    plan = plan_checkpoint(tied(model_type), load_recipe(ROOT / "recipes" / "demo.yaml", overrides))
    assert plan.schemes[-1].tensor_bytes == tensor_data_bytes(sorted(out.glob("*.safetensors")))
    # streaming writes the same tensors, and says so when the tie is broken
    streamed = tmp_path / "streamed"
    _, s_config, s_report, s_tensors = _run("demo.yaml", tied(model_type), streamed, data, *overrides, "streaming=true")
    assert s_config["tie_word_embeddings"] == config["tie_word_embeddings"]
    assert s_tensors.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(s_tensors[name], tensor), name
    notes = s_report["candidates"][0]["extra"]["quantization"]["notes"]
    assert any("tie_word_embeddings: false" in n for n in notes) is quantized_head


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_bnb_nf4_keeps_the_tie(tmp_path, tied, data, model_type):
    out = tmp_path / "out"
    _, config, report, tensors = _run("bnb_nf4.yaml", tied(model_type), out, data)
    assert report["candidates"][0]["extra"]["reload_check"]["passed"] is True
    _check_tie(config, tensors, quantized_head=False)


@pytest.mark.slow
@pytest.mark.parametrize("model_type, recipe, overrides, quantized_head", [
    ("qwen2", "qat_int8_channel.yaml", ["quantize.targets.lm_head=true"], True),
    ("llama", "qat_int8_channel.yaml", [], False),
    ("llama", "qlora_int4_domain.yaml", [], False),
])
def test_finetuned_tied_models_save(tmp_path, tied, data, model_type, recipe, overrides, quantized_head):
    out = tmp_path / "out"
    _, config, report, tensors = _run(recipe, tied(model_type), out, data, *FINETUNE, *overrides)
    final = report["candidates"][-1]
    assert final["extra"]["reload_check"]["passed"] is True
    _check_tie(config, tensors, quantized_head)
    notes = [n for c in report["candidates"] for n in (c["extra"].get("quantization") or {}).get("notes", [])]
    assert any("tie_word_embeddings: false" in n for n in notes) is quantized_head


@pytest.mark.parametrize("quantized_head", [False, True])
def test_export_of_a_tied_artifact_validates(tmp_path, tied, data, quantized_head, capsys):
    from dsq.quantize import PerGroup, WeightScheme
    from dsq.tools.testing import make_rtn_artifact

    art = tmp_path / "art"
    if quantized_head:
        _run("demo.yaml", tied("llama"), art, data, "quantize.weights.group_size=32", "quantize.targets.lm_head=true",
             "eval.reload_check=false")
    else:
        make_rtn_artifact(tied("llama"), art, WeightScheme(4, PerGroup(32), True))
    code = main(["export", str(art), "-o", str(tmp_path / "onnx"), "-q"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "onnx" / "export_manifest.json").read_text())
    assert manifest["validation"]["passed"] is True
    assert ("lm_head" in manifest["quantized_modules"]["matmul_nbits"]) is quantized_head  # the graph's lm_head is the artifact's
