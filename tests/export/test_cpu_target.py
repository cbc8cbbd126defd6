"""Exports tuned for a CPU class (``ExportConfig.cpu_target``): the int8 kernels the graph feeds, where they are
exact, what the manifest records, and the warning when the exporting CPU lacks what the graph needs."""
from __future__ import annotations

import json
import logging
from dataclasses import replace

import onnx
import pytest
import torch
from onnx import TensorProto

from dsq.cli import main
from dsq.core.errors import ExportError
from dsq.core.loading import load_checkpoint
from dsq.export import PORTABLE, VNNI, ExportConfig, OrtCausalLM, cpu_target, export_onnx
from dsq.export.cpu_target import missing_features
from dsq.quantize import TargetSpec, W8A8Config, quantize_
from dsq.quantize.w8a8 import DynamicPerToken, StaticPerTensor
from dsq.tools.testing import fast_export_config, onnx_logits_gap

FAST = fast_export_config()
VNNI_HERE = missing_features(VNNI) is None


def _w8a8(tiny_checkpoint, activations, arch: str = "llama"):
    loaded = load_checkpoint(tiny_checkpoint(arch))
    calib = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_(loaded.model, W8A8Config(activations=activations, targets=TargetSpec()), calibration=calib, progress=False)
    return loaded


@pytest.fixture(scope="module")
def w8a8_pair(tiny_checkpoint, tmp_path_factory):
    """One dynamic per-token W8A8 llama exported for both targets: (loaded, portable result, vnni result or error)."""
    loaded = _w8a8(tiny_checkpoint, DynamicPerToken())
    root = tmp_path_factory.mktemp("cpu_target")
    portable = export_onnx(loaded.model, loaded.tokenizer, root / "portable", FAST)
    try:
        vnni = export_onnx(loaded.model, loaded.tokenizer, root / "vnni", replace(FAST, cpu_target=VNNI))
    except ExportError as exc:  # allowed only on a CPU without VNNI (saturating kernels): checked below
        vnni = exc
    return loaded, portable, vnni


def _graph(path):
    return onnx.load(str(path / "model.onnx"), load_external_data=False).graph


def test_the_vnni_graph_feeds_u8_activations_and_the_int8_weights_as_they_are(w8a8_pair):
    loaded, portable, vnni = w8a8_pair
    if not VNNI_HERE:
        assert isinstance(vnni, ExportError) or vnni.validation.passed
        if isinstance(vnni, ExportError):
            assert "avx512_vnni" in str(vnni) and "cpu_target portable" in str(vnni)
            return
    ops = vnni.ops
    assert ops["com.microsoft::MatMulIntegerToFloat"] == len(vnni.plan.int8) > 0
    assert "MatMulInteger" not in ops and ops["QuantizeLinear"] >= 1
    graph = _graph(vnni.path)
    types = {t.name: t.data_type for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "MatMulIntegerToFloat":
            assert types[node.input[1]] == TensorProto.INT8  # s8 weights: the u8 x s8 kernel
            assert len(node.input) == 5  # a zero point for the activations, none for the weights
    # the portable graph is the u8 x u8 form with zero points on both operands
    assert portable.ops["MatMulInteger"] == len(portable.plan.int8)
    assert "com.microsoft::MatMulIntegerToFloat" not in portable.ops
    manifest = json.loads((vnni.path / "export_manifest.json").read_text())
    assert manifest["cpu_target"]["name"] == "vnni" and "avx512_vnni" in manifest["cpu_target"]["needs_one_of"]
    assert manifest["accuracy_level"] == 0 == vnni.accuracy_level


@pytest.mark.skipif(not VNNI_HERE, reason="u8 x s8 kernels saturate without VNNI; the test above checks that case")
def test_with_vnni_both_targets_compute_the_same_integers(w8a8_pair):
    """The two graphs differ in operand types only: where the CPU sums u8 x s8 products exactly (VNNI), their
    logits agree to float rounding (a few activations on a rounding boundary may move by one int8 step)."""
    loaded, portable, vnni = w8a8_pair
    assert vnni.validation.passed and vnni.validation.greedy_equal
    assert onnx_logits_gap(portable.path, vnni.path) <= 2e-3
    assert vnni.validation.max_abs_diff <= 10 * max(portable.validation.max_abs_diff, 1e-4)


def test_static_w8a8_exports_for_vnni(tiny_checkpoint, tmp_path):
    """The graph's form everywhere; its agreement with torch only where the u8 x s8 kernels are exact (VNNI):
    without VNNI they saturate, so the validation is opened wide there and only the form is checked."""
    loaded = _w8a8(tiny_checkpoint, StaticPerTensor())
    validation = FAST.validation if VNNI_HERE else replace(FAST.validation, tolerance=1e9)
    result = export_onnx(loaded.model, loaded.tokenizer, tmp_path / "out", replace(FAST, cpu_target=VNNI, validation=validation))
    if VNNI_HERE:
        assert result.validation.passed and result.validation.greedy_equal
        assert result.validation.max_abs_diff <= 0.25
    assert result.ops["com.microsoft::MatMulIntegerToFloat"] == len(result.plan.int8)
    graph = _graph(result.path)
    assert not any(n.op_type == "Abs" for n in graph.node)  # one calibrated scale: no per-token max |x|


def test_missing_features_names_what_the_graph_needs():
    assert missing_features(PORTABLE, set()) is None and missing_features(PORTABLE, {"avx2"}) is None
    assert missing_features(VNNI, {"avx2", "avx512_vnni"}) is None
    assert missing_features(VNNI, {"avx2", "amx_int8"}) is None
    why = missing_features(VNNI, {"avx2", "fma"})
    assert "avx512_vnni" in why and "saturate" in why
    assert "unknown" in missing_features(VNNI, set())


def test_the_export_warns_and_records_when_this_cpu_lacks_the_target(exported, tmp_path, monkeypatch, caplog):
    import dsq.export.onnx_export as onnx_export

    loaded, _ = exported("llama")
    monkeypatch.setattr(onnx_export, "missing_features", lambda target, flags=None: "this CPU has none of avx512_vnni")
    with caplog.at_level(logging.WARNING, logger="dsq.export.onnx_export"):
        result = export_onnx(loaded.model, loaded.tokenizer, tmp_path / "out", replace(FAST, cpu_target=VNNI))
    assert any("avx512_vnni" in r.getMessage() and "vnni" in r.getMessage() for r in caplog.records)
    manifest = json.loads((result.path / "export_manifest.json").read_text())
    assert manifest["cpu_target"]["export_machine"] == "this CPU has none of avx512_vnni"
    assert result.validation.passed  # an fp graph has no int8 kernels: it validates anywhere


def test_the_target_is_a_typed_choice_independent_of_the_accuracy_level():
    assert ExportConfig(cpu_target=VNNI).accuracy_level == 0  # weight-only compute stays the caller's choice
    assert cpu_target("vnni") is VNNI and cpu_target("portable") is PORTABLE
    with pytest.raises(ValueError, match="portable"):
        cpu_target("avx9")
    with pytest.raises(TypeError, match="cpu_target"):
        ExportConfig(cpu_target="vnni")


def test_recipe_and_cli_carry_the_target(exported, tiny_checkpoint, tmp_path, capsys):
    from dsq.core.errors import RecipeError
    from dsq.run.export_step import export_config
    from dsq.run.recipe import load_recipe

    assert export_config(load_recipe(None, ["export={}"]).export).cpu_target is PORTABLE
    config = export_config(load_recipe(None, ["export={cpu_target: vnni}"]).export)
    assert config.cpu_target is VNNI and config.accuracy_level == 0
    with pytest.raises(RecipeError, match="export.cpu_target"):
        load_recipe(None, ["export={cpu_target: avx9}"])
    out = tmp_path / "cli"
    code = main(["export", str(tiny_checkpoint("llama")), "-o", str(out), "--cpu-target", "vnni", "-q"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["cpu_target"]["name"] == "vnni" and manifest["accuracy_level"] == 0
    assert onnx_logits_gap(exported("llama")[1].path, out) <= 1e-4  # an fp model: the same graph either way
    with pytest.raises(SystemExit) as stop:
        main(["export", str(tiny_checkpoint("llama")), "-o", str(tmp_path / "bad"), "--cpu-target", "avx9"])
    assert stop.value.code == 2 and not (tmp_path / "bad").exists()


def test_loading_a_graph_on_a_cpu_without_its_target_warns(exported, tmp_path, monkeypatch, caplog):
    import dsq.export.runtime as runtime

    loaded, portable = exported("llama")
    out = tmp_path / "vnni"
    export_onnx(loaded.model, loaded.tokenizer, out, replace(FAST, cpu_target=VNNI))
    monkeypatch.setattr(runtime, "missing_features", lambda target, flags=None: f"no VNNI for {target.name}")
    with caplog.at_level(logging.WARNING, logger="dsq.export.runtime"):
        lm = OrtCausalLM(out)
        quiet = OrtCausalLM(portable.path)
    assert lm.cpu_warning == "no VNNI for vnni" and any("no VNNI for vnni" in r.getMessage() for r in caplog.records)
    assert quiet.cpu_warning is None  # a portable graph needs nothing of the CPU
