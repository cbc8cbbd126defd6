"""Per-module schemes (quantize.targets.schemes): mixed-precision artifacts with RTN and GPTQ."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dsq.cli import main
from dsq.core.errors import QuantizationError, RecipeError
from dsq.core.loading import load_checkpoint
from dsq.quantize import GPTQConfig, PerGroup, RTNConfig, TargetSpec, WeightScheme, quantize_
from dsq.quantize.artifact_load import load_artifact
from dsq.quantize.modules import QuantExperts, QuantLinear
from dsq.quantize.scheme import PerChannel, parse_scheme_label, scheme_label
from dsq.quantize.targets import SchemeRule
from dsq.run.recipe import load_recipe

INT4 = WeightScheme(4, PerGroup(32), True)
INT8 = WeightScheme(8, PerChannel(), True)


@pytest.mark.parametrize("label, scheme", [
    ("int4-g128", WeightScheme(4, PerGroup(128), True)),
    ("int8-ch", WeightScheme(8, PerChannel(), True)),
    ("int4-g32-asym", WeightScheme(4, PerGroup(32), False)),
])
def test_scheme_labels_round_trip(label, scheme):
    assert parse_scheme_label(label) == scheme and scheme_label(scheme) == label


@pytest.mark.parametrize("bad", ["int3-g128", "int4", "int8-g", "fp8", "int4-g128-sym"])
def test_a_bad_scheme_label_is_refused_naming_the_forms(bad):
    with pytest.raises(ValueError, match="int4-g128"):
        parse_scheme_label(bad)


def test_rtn_gives_each_module_its_rule_and_reports_kept_ones(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint("deepseek_v3")).model
    rules = (SchemeRule(r"self_attn\.kv_b_proj$", None), SchemeRule(r"self_attn\.", INT8), SchemeRule(r"mlp\.experts$", INT8))
    report = quantize_(model, RTNConfig(INT4, TargetSpec(schemes=rules)), progress=False)
    by_name = {r.name: r for r in report.modules}
    for name, module in model.named_modules():
        if name.endswith("self_attn.kv_b_proj"):
            assert type(module) is nn.Linear and not by_name[name].quantized
            assert "kept by scheme rule" in by_name[name].reason
        elif ".self_attn." in name and name in by_name:
            assert isinstance(module, QuantLinear) and module.scheme == INT8
        elif name.endswith("mlp.experts"):
            assert isinstance(module, QuantExperts) and module.gate_up_proj.scheme == INT8
        elif isinstance(module, QuantLinear):  # every other Linear: the method's scheme
            assert module.scheme == INT4, name
    assert any(isinstance(m, QuantLinear) and m.scheme == INT4 for m in model.modules())


def test_gptq_solves_each_module_with_its_own_scheme(tiny_checkpoint):
    """Layer 0's attention projections see the embeddings in both runs, so their GPTQ integers under a rule
    equal those of a run where every module has that scheme."""
    ckpt = tiny_checkpoint("deepseek_v3")
    calib = torch.randint(3, 500, (8, 32), generator=torch.Generator().manual_seed(0))
    mixed = load_checkpoint(ckpt).model
    quantize_(mixed, GPTQConfig(INT4, TargetSpec(schemes=(SchemeRule(r"self_attn\.", INT8),)), batch_size=4),
              calibration=calib, progress=False)
    uniform = load_checkpoint(ckpt).model
    quantize_(uniform, GPTQConfig(INT8, TargetSpec(), batch_size=4), calibration=calib, progress=False)
    attention = [n for n, m in mixed.named_modules() if n.startswith("model.layers.0.self_attn.") and isinstance(m, QuantLinear)]
    assert len(attention) >= 4
    for name in attention:
        a, b = mixed.get_submodule(name).weight_q, uniform.get_submodule(name).weight_q
        assert a.scheme == INT8
        assert torch.equal(a.packed, b.packed) and torch.equal(a.scale, b.scale)
    assert mixed.get_submodule("model.layers.0.mlp.down_proj").scheme == INT4


def test_a_one_scheme_method_refuses_rules(tiny_checkpoint, tmp_path, capsys):
    from dsq.quantize import AWQConfig

    model = load_checkpoint(tiny_checkpoint("llama")).model
    with pytest.raises(QuantizationError, match="quantize.targets.schemes: quantize.method 'awq'"):
        quantize_(model, AWQConfig(targets=TargetSpec(schemes=(SchemeRule("mlp", INT8),))),
                  calibration=torch.zeros(2, 8, dtype=torch.long), progress=False)
    code = main(["run", "recipes/demo.yaml", f"model={tiny_checkpoint('llama')}", f"output={tmp_path / 'out'}",
                 "quantize.method=awq", 'quantize.targets.schemes=[{pattern: mlp, scheme: int8-ch}]', "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "methods with per-module schemes: rtn, gptq" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_bad_rule_in_a_recipe_names_the_key():
    with pytest.raises(RecipeError, match="quantize.targets.schemes.0.scheme"):
        load_recipe(None, ['quantize.targets.schemes=[{pattern: mlp, scheme: int5-g7}]'])
    with pytest.raises(RecipeError, match="quantize.targets.schemes.0.pattern"):
        load_recipe(None, ['quantize.targets.schemes=[{pattern: "(", scheme: keep}]'])


def test_a_mixed_artifact_reloads_in_transformers_and_in_dsq_with_the_same_logits(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "mixed"
    code = main(["run", "recipes/demo.yaml", f"model={tiny_checkpoint('deepseek_v3')}", f"output={out}",
                 "eval.multiple_choice=null", "eval.perplexity.max_tokens=512", "eval.fidelity.max_tokens=256",
                 "eval.gates={}", "quantize.weights.group_size=32", 'quantize.targets.schemes=[{pattern: self_attn, scheme: int8-ch}, '
                 '{pattern: "layers[.]0[.]mlp[.]down_proj", scheme: keep}, {pattern: shared_experts, scheme: int4-g32-asym}, '
                 '{pattern: experts, scheme: int8-ch}]', "-q"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "transformers reload: max |delta logit|" in printed.out  # the run's own reload check passed
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    bits = {(g["weights"]["num_bits"], g["weights"]["strategy"], g["weights"]["symmetric"]) for g in qconfig["config_groups"].values()}
    assert bits == {(8, "channel", True), (4, "group", True), (4, "group", False)}
    assert "model.layers.0.mlp.down_proj" in qconfig["ignore"]
    dsq_model = load_artifact(out).model
    assert dsq_model.get_submodule("model.layers.1.self_attn.q_b_proj").scheme == INT8
    assert dsq_model.get_submodule("model.layers.1.mlp.experts").gate_up_proj.scheme == INT8
    assert not dsq_model.get_submodule("model.layers.1.mlp.shared_experts.up_proj").scheme.symmetric
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, dsq_model(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_the_plan_counts_each_module_at_its_own_scheme(tiny_checkpoint, tmp_path):
    from dsq.tools.plan import plan_checkpoint
    from dsq.tools.testing import tensor_data_bytes

    ckpt = tiny_checkpoint("deepseek_v3")
    rules = 'quantize.targets.schemes=[{pattern: self_attn, scheme: int8-ch}, {pattern: "layers[.]0[.]mlp", scheme: keep}]'
    overrides = ["quantize.weights.bits=4", "quantize.weights.group_size=32", rules]
    planned = plan_checkpoint(ckpt, load_recipe(None, overrides)).schemes[-1].tensor_bytes
    uniform4 = plan_checkpoint(ckpt, load_recipe(None, overrides[:2])).schemes[-1].tensor_bytes
    assert planned > uniform4
    out = tmp_path / "mixed"
    assert main(["run", "recipes/demo.yaml", f"model={ckpt}", f"output={out}", "eval.multiple_choice=null",
                 "eval.perplexity.max_tokens=256", "eval.fidelity.max_tokens=128", "eval.gates={}", "eval.reload_check=false",
                 *overrides, "-q"]) == 0
    written = tensor_data_bytes(out.glob("*.safetensors"))
    assert planned == written
