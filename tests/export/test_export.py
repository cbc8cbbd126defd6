"""Whole-model ONNX exports with KV cache: every architecture, fp and quantized, checked against torch."""
from __future__ import annotations

import json
from dataclasses import replace

import onnx
import pytest
import torch

from dsq.core.loading import load_checkpoint
from dsq.core.errors import DsqInputError, ExportError
from dsq.export import DequantizeLinearWeights, ExportConfig, OrtCausalLM, SamplingConfig, ValidationConfig, export_onnx
from dsq.quantize import PerChannel, PerGroup, RTNConfig, TargetSpec, WeightScheme, quantize_

from dsq.tools.testing import fast_export_config

FAST = fast_export_config()

def _node_counts(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("arch", ["llama", "qwen2", "deepseek_v2", "deepseek_v3"])
def test_fp_export_matches_torch_and_generates_like_transformers(exported, arch):
    loaded, result = exported(arch)
    v = result.validation
    assert v.passed and v.max_abs_diff <= 1e-4 and v.greedy_equal
    assert {c.kind for c in v.cases} == {"prefill", "decode", "greedy"}
    manifest = json.loads((result.path / "export_manifest.json").read_text())
    assert manifest["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert manifest["outputs"][1:3] == ["present.0.key", "present.0.value"]
    assert manifest["validation"]["passed"] is True
    assert (result.path / "model.onnx.data").is_file() and (result.path / "genai_config.json").is_file()
    # one graph, prefill from an empty cache then decode steps: the same tokens as transformers' generate
    lm = OrtCausalLM(result.path)
    prompt = torch.tensor([[0, 17, 42, 99, 7, 300]])
    ours = lm.generate(prompt, max_new_tokens=24)
    reference = loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                      do_sample=False, eos_token_id=None, pad_token_id=2)
    assert torch.equal(ours, reference)


def _attention_inputs(path) -> list[tuple[str, str]]:
    """(key, value) inputs of every ``Attention`` node of the graph at ``path``."""
    return [(n.input[1], n.input[2]) for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "Attention"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_grouped_attention_is_one_node_per_layer_reading_the_cache_as_it_is(exported, arch):
    """Opset 23: one Attention node per layer, fed the present key/value tensors themselves (2 key/value heads
    for 4 query heads; no per-query-head copy of the cache), and one RMSNormalization per norm."""
    loaded, result = exported(arch)
    c = loaded.model.config
    assert c.num_key_value_heads < c.num_attention_heads
    manifest = json.loads((result.path / "export_manifest.json").read_text())
    assert manifest["opset"] == 23
    counts = _node_counts(result.onnx_path)
    assert counts["RMSNormalization"] == 2 * c.num_hidden_layers + 1
    assert _attention_inputs(result.onnx_path) == [(f"present.{i}.key", f"present.{i}.value") for i in range(c.num_hidden_layers)]


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_absorbed_mla_keeps_its_matmuls_at_opset_23(exported, arch):
    """Every head of absorbed MLA reads the one latent head; a MatMul folds the heads into one product, so no
    Attention node (ORT's runs the heads one by one: no faster, benchmarks/RESULTS.md)."""
    loaded, result = exported(arch)
    assert all(v.startswith("absorbed") for v in result.plan.mla.values())
    counts = _node_counts(result.onnx_path)
    assert "Attention" not in counts and counts["RMSNormalization"] >= 2 * loaded.model.config.num_hidden_layers + 1


def test_opset_21_graph_computes_attention_from_elementary_ops(tiny_checkpoint, tmp_path):
    loaded = load_checkpoint(tiny_checkpoint("llama"))
    result = export_onnx(loaded.model, loaded.tokenizer, tmp_path / "o21", replace(FAST, opset=21))
    assert result.validation.passed and result.validation.max_abs_diff <= 1e-4 and result.validation.greedy_equal
    counts = _node_counts(result.onnx_path)
    assert "Attention" not in counts and "RMSNormalization" not in counts and counts["Softmax"] == loaded.model.config.num_hidden_layers
    assert json.loads((result.path / "export_manifest.json").read_text())["opset"] == 21
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {21}


def test_unknown_opset_is_refused():
    with pytest.raises(ValueError, match="opset must be one of"):
        ExportConfig(opset=22)


def test_mla_cache_holds_the_compressed_latent(exported):
    loaded, result = exported("deepseek_v3")
    c = loaded.model.config
    lay = result.layout
    assert lay.mla and lay.kv_heads == 1 and (lay.key_dim, lay.value_dim) == (c.kv_lora_rank, c.qk_rope_head_dim)
    inputs = {i.name: i.shape for i in OrtCausalLM(result.path).session.get_inputs()}
    assert inputs["past_key_values.0.key"][1:] == [1, "past_sequence", c.kv_lora_rank]


def test_quantized_deepseek_carries_every_expert_as_matmul_nbits(exported):
    loaded, result = exported("deepseek_v3", "int4", moe_op=False)  # the sparse form (tests/export/test_moe_op.py: fused)
    v = result.validation
    assert v.passed and v.max_abs_diff <= 1e-3 and v.greedy_equal
    c = loaded.model.config
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace
    assert set(result.plan.experts.values()) == {c.n_routed_experts} and len(result.plan.experts) == moe_layers
    counts = _node_counts(result.onnx_path)
    linears = len(result.plan.nbits) - moe_layers
    assert counts["MatMulNBits"] == linears + 2 * c.n_routed_experts * moe_layers
    assert counts.get("TopK", 0) >= moe_layers  # routing is computed in the graph, at run time
    names = {t.name for t in onnx.load(str(result.onnx_path), load_external_data=False).graph.initializer}
    for e in range(c.n_routed_experts):
        assert any(f"experts.experts.{e}.down.b" in n for n in names), f"expert {e} is missing from the graph"
    fp_bytes = exported("deepseek_v3", moe_op=False)[1].onnx_bytes
    assert result.onnx_bytes < 0.6 * fp_bytes


def test_w8a8_export_uses_integer_matmuls(exported):
    loaded, result = exported("llama", "w8a8")
    assert result.validation.passed and result.validation.greedy_equal
    counts = _node_counts(result.onnx_path)
    assert counts["MatMulInteger"] == len(result.plan.int8)
    assert counts.get("MatMulNBits", 0) == 0


def test_ort_model_is_evaluated_like_a_torch_model(exported):
    from dsq.eval.perplexity import PerplexityConfig, perplexity

    loaded, result = exported("llama")
    ids = torch.randint(3, 500, (300,), generator=torch.Generator().manual_seed(1))
    config = PerplexityConfig(context=64, stride=32)
    ours = perplexity(OrtCausalLM(result.path), ids, config, batch_size=4, progress=False)
    theirs = perplexity(loaded.model, ids, config, batch_size=4, progress=False)
    assert abs(ours.ppl / theirs.ppl - 1) < 1e-5
    assert OrtCausalLM(result.path).weight_bytes() == pytest.approx(
        sum(p.numel() * 4 for p in loaded.model.parameters()), rel=0.01)


def test_left_padded_batch_generates_what_each_row_generates_alone(exported):
    _, result = exported("qwen2")
    lm = OrtCausalLM(result.path)
    short, long = [5, 9, 200], [0, 17, 42, 99, 7]
    batch = torch.tensor([[2, 2] + short, long])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    together = lm.generate(batch, attention_mask=mask, max_new_tokens=12)
    alone = [lm.generate(torch.tensor([row]), max_new_tokens=12) for row in (short, long)]
    assert torch.equal(together[0, 2:], alone[0][0]) and torch.equal(together[1], alone[1][0])


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_padded_positions_compute_what_torch_computes(exported, arch):
    """A left-padded position attends to no key: PyTorch's sdpa gives it a zero attention output, and so must the
    graph (its additive mask alone would average every value). Activations quantized per tensor see those positions."""
    from dsq.export.decoder import cache_layout
    from dsq.export.validate import TorchCachedDecoder

    loaded, result = exported(arch)
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    lm, ref = OrtCausalLM(result.path), TorchCachedDecoder(loaded.model, cache_layout(loaded.model.config))
    ours, _ = lm.step(ids, mask, lm.empty_past(2))
    theirs, _ = ref.step(ids, mask, ref.empty_past(2))
    assert (ours - theirs)[0, :5].abs().max() <= 1e-4  # the padded positions themselves


def test_sampling_is_seeded_and_top_k_1_is_greedy(exported):
    _, result = exported("llama")
    lm = OrtCausalLM(result.path)
    prompt = torch.tensor([[0, 17, 42]])
    a = lm.generate(prompt, max_new_tokens=16, sampling=SamplingConfig(do_sample=True, temperature=1.5, seed=3))
    b = lm.generate(prompt, max_new_tokens=16, sampling=SamplingConfig(do_sample=True, temperature=1.5, seed=3))
    c = lm.generate(prompt, max_new_tokens=16, sampling=SamplingConfig(do_sample=True, temperature=1.5, seed=4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = lm.generate(prompt, max_new_tokens=16)
    assert torch.equal(lm.generate(prompt, max_new_tokens=16, sampling=SamplingConfig(do_sample=True, top_k=1)), greedy)
    eos = int(greedy[0, 5])
    first = 3 + greedy[0, 3:].tolist().index(eos)  # the first generated position holding it
    stopped = lm.generate(prompt, max_new_tokens=16, eos_token_id=eos)
    assert torch.equal(stopped[0], greedy[0, : first + 1])
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(do_sample=True, top_p=0.0)


def test_export_that_does_not_match_fails_and_leaves_nothing(tiny_checkpoint, tmp_path):
    loaded = load_checkpoint(tiny_checkpoint("llama"))
    strict = ExportConfig(validation=ValidationConfig(batch_sizes=(1,), seq_lens=(9,), tolerance=1e-30))
    with pytest.raises(ExportError, match=r"does not match PyTorch: prefill batch 1 x 9: max \|delta logit\|"):
        export_onnx(loaded.model, loaded.tokenizer, tmp_path / "out", strict)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("variant", ["fp", "w8a8"])
def test_int8_activation_graph_missing_only_the_tolerance_says_what_to_check(tiny_checkpoint, tmp_path, variant):
    from dsq.quantize import W8A8Config
    from dsq.quantize.w8a8 import DynamicPerToken

    loaded = load_checkpoint(tiny_checkpoint("llama"))
    if variant == "w8a8":
        calib = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
        quantize_(loaded.model, W8A8Config(activations=DynamicPerToken(), targets=TargetSpec()), calibration=calib, progress=False)
    strict = replace(FAST, validation=replace(FAST.validation, tolerance=1e-30))
    with pytest.raises(ExportError, match="does not match PyTorch") as exc:
        export_onnx(loaded.model, loaded.tokenizer, tmp_path / "out", strict)
    assert ("greedy tokens are identical" in str(exc.value) and "export.validation.tolerance" in str(exc.value)) is (variant == "w8a8")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_replaced_without_overwrite(exported, tiny_checkpoint):
    loaded, result = exported("llama")
    with pytest.raises(DsqInputError, match="already exists"):
        export_onnx(loaded.model, loaded.tokenizer, result.path, FAST)
    (result.path.parent / "other").mkdir()
    (result.path.parent / "other" / "x.txt").write_text("mine")
    with pytest.raises(DsqInputError, match="export_manifest.json"):
        export_onnx(loaded.model, loaded.tokenizer, result.path.parent / "other", FAST, overwrite=True)
    assert (result.path.parent / "other" / "x.txt").read_text() == "mine"


def test_bitsandbytes_layers_are_refused_by_name(tiny_checkpoint, tmp_path):
    from dsq.quantize import BnbNF4Config

    loaded = load_checkpoint(tiny_checkpoint("llama"))
    quantize_(loaded.model, BnbNF4Config(targets=TargetSpec()), progress=False)
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj: bitsandbytes layers have no ONNX form"):
        export_onnx(loaded.model, loaded.tokenizer, tmp_path / "out", FAST)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scheme", [WeightScheme(4, PerGroup(32), False), WeightScheme(8, PerChannel(), True)],
                         ids=lambda s: s.describe())
def test_portable_weights_are_standard_dequantize_linear(tiny_checkpoint, tmp_path, scheme):
    loaded = load_checkpoint(tiny_checkpoint("deepseek_v3"))
    quantize_(loaded.model, RTNConfig(scheme, TargetSpec()), progress=False)
    config = replace(FAST, weights=DequantizeLinearWeights())
    result = export_onnx(loaded.model, loaded.tokenizer, tmp_path / "out", config)
    assert result.validation.passed and result.validation.max_abs_diff <= 1e-3
    graph = onnx.load(str(result.onnx_path), load_external_data=False)
    assert all(node.domain in ("", "ai.onnx") for node in graph.graph.node)  # no contrib op left
    assert {o.domain for o in graph.opset_import} <= {"", "ai.onnx"}
    expected = onnx.TensorProto.UINT4 if scheme.bits == 4 else onnx.TensorProto.UINT8
    q = [t for t in graph.graph.initializer if t.name.endswith(".q")]
    assert q and all(t.data_type == expected for t in q)
    assert result.ops["DequantizeLinear"] == sum(2 * e for e in result.plan.experts.values()) + len(result.plan.nbits) - len(result.plan.experts)


def test_bf16_model_exports_an_fp32_graph_checked_against_an_fp32_copy(tiny_checkpoint, tmp_path):
    loaded = load_checkpoint(tiny_checkpoint("llama"), dtype=torch.bfloat16)
    quantize_(loaded.model, RTNConfig(WeightScheme(4, PerGroup(32), True), TargetSpec()), progress=False)
    result = export_onnx(loaded.model, loaded.tokenizer, tmp_path / "out", FAST)
    assert result.validation.passed and result.validation.max_abs_diff <= 1e-3
    assert next(loaded.model.parameters()).dtype == torch.bfloat16  # the caller's model is untouched
    assert OrtCausalLM(result.path).session.get_outputs()[0].type == "tensor(float)"


def test_quantized_embedding_is_int8_and_the_reference_gets_the_same_table(tiny_checkpoint, tmp_path):
    loaded = load_checkpoint(tiny_checkpoint("qwen2"))
    before = loaded.model.get_input_embeddings().weight.clone()
    result = export_onnx(loaded.model, loaded.tokenizer, tmp_path / "out", replace(FAST, quantize_embeddings=True))
    assert result.validation.passed and result.validation.max_abs_diff <= 1e-4
    assert torch.equal(loaded.model.get_input_embeddings().weight, before)
    graph = onnx.load(str(result.onnx_path), load_external_data=False).graph
    vocab, hidden = before.shape
    tables = [t for t in graph.initializer if list(t.dims) == [vocab, hidden] and t.data_type == onnx.TensorProto.INT8]
    assert len(tables) == 1 and result.plan.embedding == "int8 per-row symmetric"


@pytest.mark.parametrize("installed, opset, refused", [("1.22.1", 23, True), ("1.23.0", 23, False), ("1.22.1", 21, False),
                                                       ("1.33.0.dev20261201", 23, False), ("1.19.2", 21, True)])
def test_an_opset_the_installed_runtime_cannot_run_is_refused_by_name(installed, opset, refused):
    from dsq.export.runtime import runtime_refusal

    why = runtime_refusal(opset, installed)
    assert (why is not None) is refused
    if refused:
        assert f"onnxruntime is {installed}" in why
        assert ("--opset 21" in why and ">= 1.23" in why) if opset == 23 else (">= 1.20" in why and "--opset" not in why)


def test_export_refuses_before_writing_when_the_runtime_is_too_old(tiny_checkpoint, tmp_path, monkeypatch):
    import onnxruntime

    loaded = load_checkpoint(tiny_checkpoint("llama"))
    monkeypatch.setattr(onnxruntime, "__version__", "1.22.0")
    with pytest.raises(ExportError, match=r"opset 23 needs onnxruntime >= 1.23.*1.22.0"):
        export_onnx(loaded.model, loaded.tokenizer, tmp_path / "out", FAST)
    assert list(tmp_path.iterdir()) == []


def test_a_graph_the_installed_runtime_cannot_run_is_refused_on_load(exported, monkeypatch):
    import onnxruntime

    _, result = exported("llama")
    monkeypatch.setattr(onnxruntime, "__version__", "1.22.0")
    with pytest.raises(DsqInputError, match=r"model.onnx: opset 23 needs onnxruntime >= 1.23.*1.22.0.*--opset 21"):
        OrtCausalLM(result.path)
