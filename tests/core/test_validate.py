"""``dsq validate``: integrity, gates, JUnit and exit codes on planted good, corrupt and collapsed artifacts."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsq.core.manifest import write_manifest
from dsq.cli import main
from dsq.tools.testing import make_rtn_artifact

HELD_OUT = "def add(a, b):\n    return a + b\n\n" * 40


@pytest.fixture()
def setup(tmp_path, tiny_checkpoint):
    """An INT8 artifact of a tiny Llama, its baseline, and a gates file with absolute and relative gates."""
    base = tiny_checkpoint("llama")
    art = make_rtn_artifact(base, tmp_path / "int8")
    text = tmp_path / "held.txt"
    text.write_text(HELD_OUT)
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"context": "def add(a, b):\n", "choices": ["    return a + b\n", " zzz"], "gold": 0}) + "\n"
                          for _ in range(4)))
    gates = tmp_path / "gates.yaml"
    gates.write_text(
        f"perplexity: {{data: {text}, context: 64, stride: 32}}\nmultiple_choice: {{data: {mc}}}\n"
        "fidelity: {seq_len: 32, max_tokens: 256}\n"
        "gates: {max_ppl_increase_pct: 5, min_top1_agreement: 0.9, max_size_ratio: 0.6, max_ppl: 100000}\n"
    )
    return base, art, gates


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_good_artifact_passes_with_junit_listing_each_gate(setup, tmp_path, capsys):
    base, art, gates = setup
    code, out, err = _run(capsys, "validate", art, "--baseline", base, "--gates", gates, "-o", tmp_path / "ci", "-q")
    assert code == 0, err
    suite = ET.parse(tmp_path / "ci" / "junit.xml").getroot().find("testsuite")
    names = [c.get("name") for c in suite.findall("testcase")]
    assert names == ["integrity (manifest.json)", "max_ppl_increase_pct", "max_ppl", "min_top1_agreement", "max_size_ratio"]
    assert suite.get("failures") == "0" and not suite.findall("testcase/failure")
    assert "PASS" in (tmp_path / "ci" / "summary.md").read_text().splitlines()[0]


def test_one_changed_byte_exits_2_naming_the_file(setup, tmp_path, capsys):
    base, art, gates = setup
    weights = art / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    code, _, err = _run(capsys, "validate", art, "--baseline", base, "--gates", gates, "-o", tmp_path / "ci", "-q")
    assert code == 2 and f"{weights}: sha256 differs from manifest.json" in err
    assert not (tmp_path / "ci").exists()


def test_missing_file_exits_2_naming_it(setup, tmp_path, capsys):
    base, art, gates = setup
    (art / "tokenizer.json").unlink()
    code, _, err = _run(capsys, "validate", art, "--gates", gates, "-q")
    assert code == 2 and "tokenizer.json: listed in manifest.json but missing" in err


def test_collapsed_artifact_exits_1_naming_the_gate(setup, tmp_path, capsys):
    """Scrambled scales written by a broken tool with a consistent manifest: only the gates can catch it."""
    base, art, gates = setup
    tensors = load_file(art / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for key in [k for k in tensors if k.endswith("weight_scale")]:
        flat = tensors[key].flatten()
        tensors[key] = flat[torch.randperm(flat.numel(), generator=gen)].reshape(tensors[key].shape) * 8
    save_file(tensors, str(art / "model.safetensors"), metadata={"format": "pt"})
    write_manifest(art, source={})
    code, _, err = _run(capsys, "validate", art, "--baseline", base, "--gates", gates, "-o", tmp_path / "ci", "-q")
    assert code == 1
    assert "GATE FAILED: int8: max_ppl_increase_pct failed" in err and "min_top1_agreement failed" in err
    failures = ET.parse(tmp_path / "ci" / "junit.xml").getroot().findall("testsuite/testcase/failure")
    assert len(failures) >= 2 and all("failed" in f.get("message") for f in failures)
    assert "FAIL" in (tmp_path / "ci" / "summary.md").read_text().splitlines()[0]


def test_relative_gate_without_baseline_is_an_input_error(setup, capsys):
    _, art, gates = setup
    code, _, err = _run(capsys, "validate", art, "--gates", gates, "-q")
    assert code == 2 and "max_ppl_increase_pct compares with a baseline: pass --baseline" in err


def test_onnx_export_is_validated_in_onnxruntime(setup, tmp_path, capsys):
    base, art, gates = setup
    code, _, err = _run(capsys, "export", art, "-o", tmp_path / "onnx", "-q")
    assert code == 0, err
    # the tiny graph's external data is padded for alignment: a size gate would measure the padding
    gates.write_text(gates.read_text().replace("max_size_ratio: 0.6", "max_size_ratio: 1.0"))
    code, out, err = _run(capsys, "validate", tmp_path / "onnx", "--baseline", base, "--gates", gates,
                          "-o", tmp_path / "ci", "-q")
    assert code == 0, err
    assert "integrity (export_manifest.json)" in out
    report = json.loads((tmp_path / "ci" / "report.json").read_text())
    assert report["candidates"][0]["fidelity"]["top1_agreement"] > 0.9


def test_unknown_key_in_gates_file_exits_2_naming_key_and_file(setup, tmp_path, capsys):
    base, art, gates = setup
    bad = tmp_path / "bad_gates.yaml"
    bad.write_text("gates: {max_ppl_increse_pct: 1}\n")
    code, _, err = _run(capsys, "validate", art, "--baseline", base, "--gates", bad, "-o", tmp_path / "ci", "-q")
    assert code == 2 and "unknown key 'gates.max_ppl_increse_pct'" in err and str(bad) in err
    assert not (tmp_path / "ci").exists()
