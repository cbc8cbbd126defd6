"""Absorbed MLA in the ONNX export: attention over the cached latent, kv_b_proj folded into query and output."""
from __future__ import annotations

import copy
import json

import onnx
import pytest
import torch

from dsq.cli import main
from dsq.core.loading import load_checkpoint
from dsq.export.mla import AbsorbedLatentProjection, absorb_latent_projections_, absorbed_forward
from dsq.export.patches import traceable
from dsq.quantize import PerGroup, RTNConfig, TargetSpec, WeightScheme, quantize_
from dsq.tools.testing import onnx_logits_gap


def _logits_with_cache(model, ids: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ``ids``, then one cached step of ``step``: both logits."""
    with torch.no_grad():
        first = model(input_ids=ids, use_cache=True)
        second = model(input_ids=step, past_key_values=first.past_key_values, use_cache=True)
    return first.logits, second.logits


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("quantized", [False, True])
def test_absorbed_attention_equals_the_expanded_one_in_torch(tiny_checkpoint, arch, quantized):
    model = load_checkpoint(tiny_checkpoint(arch)).model.eval()
    if quantized:  # kv_b_proj a QuantLinear: absorbed from its dequantized weight
        quantize_(model, RTNConfig(WeightScheme(4, PerGroup(32), False), TargetSpec()), progress=False)
    absorbed = copy.deepcopy(model)
    done = absorb_latent_projections_(absorbed)
    layers = model.config.num_hidden_layers
    assert len(done) == layers and all(v.startswith("absorbed") for v in done.values())
    assert ("dequantized int4" in next(iter(done.values()))) is quantized
    ids = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(1))
    step = torch.randint(3, 500, (2, 3), generator=torch.Generator().manual_seed(2))
    with traceable(model):
        expected = _logits_with_cache(model, ids, step)
    with traceable(absorbed), absorbed_forward(absorbed):
        got = _logits_with_cache(absorbed, ids, step)
    for a, b in zip(got, expected):
        assert not torch.equal(a, b)  # a different computation ...
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)  # ... of the same function
    assert model.config._attn_implementation == absorbed.config._attn_implementation == "sdpa"  # restored


def test_outside_the_absorbed_forward_the_latent_is_never_expanded(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint("deepseek_v3")).model.eval()
    absorb_latent_projections_(model)
    projection = model.model.layers[0].self_attn.kv_b_proj
    assert isinstance(projection, AbsorbedLatentProjection)
    heads, c = model.config.num_attention_heads, model.config
    assert projection.uk.shape == (heads, c.qk_nope_head_dim, c.kv_lora_rank)
    assert projection.uv_t.shape == (heads, c.kv_lora_rank, c.v_head_dim)
    with pytest.raises(RuntimeError, match="never applied to the latent"), torch.no_grad():
        model(input_ids=torch.tensor([[3, 4, 5]]))


def _initializers(path) -> set[str]:
    return {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer}


@pytest.mark.parametrize("variant", ["fp", "int4"])
def test_export_attends_in_the_latent_space_by_default(exported, variant):
    loaded, result = exported("deepseek_v3", variant)
    assert result.validation.passed and result.validation.greedy_equal
    layers = range(loaded.model.config.num_hidden_layers)
    manifest = json.loads((result.path / "export_manifest.json").read_text())
    mla = manifest["quantized_modules"]["mla_attention"]
    assert sorted(mla) == [f"model.layers.{i}.self_attn" for i in layers]
    assert all(v.startswith("absorbed") for v in mla.values())
    assert not any("kv_b_proj" in name for name in manifest["quantized_modules"]["matmul_nbits"])
    kv_b = {n for n in _initializers(result.onnx_path) if ".kv_b_proj." in n}  # the traced module is model.model...
    assert kv_b == {f"model.model.layers.{i}.self_attn.kv_b_proj.{b}" for i in layers for b in ("uk", "uv_t")}


def test_a_w8a8_kv_b_proj_keeps_the_expanded_attention_and_says_so(exported):
    loaded, result = exported("deepseek_v3", "w8a8")
    manifest = json.loads((result.path / "export_manifest.json").read_text())
    mla = manifest["quantized_modules"]["mla_attention"]
    assert len(mla) == loaded.model.config.num_hidden_layers and all(v == "expanded: W8A8Linear kv_b_proj is not absorbed" for v in mla.values())
    assert "model.layers.0.self_attn.kv_b_proj" in manifest["quantized_modules"]["int8_matmul"]
    assert result.validation.passed


def test_the_expanded_form_from_the_cli_gives_the_same_logits(exported, tiny_checkpoint, tmp_path, capsys):
    _, absorbed = exported("deepseek_v3")
    out = tmp_path / "expanded"
    code = main(["export", str(tiny_checkpoint("deepseek_v3")), "-o", str(out), "--no-absorb-mla", "-q"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["quantized_modules"]["mla_attention"] == {}
    assert not any(n.endswith("kv_b_proj.uk") for n in _initializers(out / "model.onnx"))
    assert onnx_logits_gap(absorbed.path, out) <= 5e-5
