"""Sparse routed experts in the ONNX export: each token runs only its top-k experts, same numbers as dense."""
from __future__ import annotations

import copy
import json

import onnx
import pytest
import torch

from dsq.cli import main
from dsq.core.loading import load_checkpoint
from dsq.eval.speed import TorchCachedLM
from dsq.export import OrtCausalLM
from dsq.export.modules import DenseRoutedExperts, SparseRoutedExperts, prepare_for_export
from dsq.quantize import PerGroup, RTNConfig, TargetSpec, W8A8Config, WeightScheme, quantize_
from dsq.quantize.modules import QuantExperts
from dsq.quantize.w8a8 import DynamicPerToken, W8A8Experts
from dsq.tools.testing import onnx_logits_gap

EXPERTS = "model.layers.1.mlp.experts"  # the tiny DeepSeek models' MoE layer (8 experts, top-2)


def _model(tiny_checkpoint, variant: str) -> torch.nn.Module:
    model = load_checkpoint(tiny_checkpoint("deepseek_v3")).model
    if variant == "int4":
        quantize_(model, RTNConfig(WeightScheme(4, PerGroup(32), False), TargetSpec()), progress=False)
    elif variant == "w8a8":
        calib = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
        quantize_(model, W8A8Config(activations=DynamicPerToken(), targets=TargetSpec()), calibration=calib, progress=False)
    return model


def _routing(tokens: int, experts: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden (T, 128)``, ``top_k_index (T, k)`` (distinct experts per token), ``top_k_weights (T, k)``."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    return torch.randn(tokens, 128, generator=gen), index, torch.rand(tokens, k, generator=gen)


@pytest.mark.parametrize("variant, fused_type", [("fp", None), ("int4", QuantExperts), ("w8a8", W8A8Experts)])
def test_sparse_experts_equal_dense_and_the_fused_module_in_torch(tiny_checkpoint, variant, fused_type):
    model = _model(tiny_checkpoint, variant)
    fused = model.get_submodule(EXPERTS)
    assert fused_type is None or isinstance(fused, fused_type)
    forms = {}
    for dense in (False, True):
        copied = copy.deepcopy(model)
        plan = prepare_for_export(copied, dense_experts=dense)
        forms[dense] = copied.get_submodule(EXPERTS)
        assert plan.to_dict()["routed_experts"] == {EXPERTS: {"experts": 8, "form": "dense" if dense else "sparse"}}
    sparse, dense = forms[False], forms[True]
    assert isinstance(sparse, SparseRoutedExperts) and isinstance(dense, DenseRoutedExperts)
    rows = [0] * 8
    hooks = [e.register_forward_pre_hook(lambda m, a, i=i: rows.__setitem__(i, rows[i] + a[0].shape[0]))
             for i, e in enumerate(sparse.experts)]
    with torch.no_grad():
        for tokens, seed in ((1, 0), (3, 1), (40, 2)):  # 1 and 3 tokens leave most experts without a token
            hidden, index, weights = _routing(tokens, 8, 2, seed)
            rows = [0] * 8
            ours = sparse(hidden, index, weights)
            assert rows == torch.bincount(index.flatten(), minlength=8).tolist()  # k rows per token, not E
            torch.testing.assert_close(ours, dense(hidden, index, weights), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours, fused(hidden, index, weights), atol=1e-5, rtol=1e-5)
    for h in hooks:
        h.remove()


def _expert_inputs(path) -> dict[str, tuple[str, onnx.NodeProto | None]]:
    """Per expert ``gate_up`` matmul: (its activation input, the node producing it)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    weights = {t.name for t in graph.initializer}
    out = {}
    for node in graph.node:
        named = [i for i in node.input if i in weights and ".experts.experts." in i and ".gate_up." in i]
        if named:
            out[named[0].rsplit(".gate_up.", 1)[0]] = (node.input[0], producer.get(node.input[0]))
    return out


@pytest.mark.parametrize("variant", ["fp", "int4"])
def test_sparse_export_passes_validation_and_feeds_each_expert_its_own_tokens(exported, variant):
    _, result = exported("deepseek_v3", variant, moe_op=False)
    v = result.validation
    assert v.passed and v.greedy_equal and {c.kind for c in v.cases} == {"prefill", "decode", "greedy"}
    assert not result.plan.dense_experts
    manifest = json.loads((result.path / "export_manifest.json").read_text())
    assert manifest["quantized_modules"]["routed_experts"] == {EXPERTS: {"experts": 8, "form": "sparse"}}
    inputs = _expert_inputs(result.onnx_path)
    assert len(inputs) == 8 and len({name for name, _ in inputs.values()}) == 8  # a different input per expert
    splits = {id(node): node for _, node in inputs.values()}
    assert len(splits) == 1  # all cut from one tensor by one Split ...
    (split,) = splits.values()
    assert split.op_type == "Split" and len(split.output) == 8
    constants = {t.name for t in onnx.load(str(result.onnx_path), load_external_data=False).graph.initializer}
    assert split.input[1] and split.input[1] not in constants  # ... into sizes counted at run time


def test_one_token_decode_routes_to_k_experts_and_matches_torch(exported):
    loaded, result = exported("deepseek_v3", "int4", moe_op=False)
    model = loaded.model
    routed = []
    hook = model.get_submodule(EXPERTS).register_forward_pre_hook(lambda m, args: routed.append(args[1].clone()))
    prompt = torch.tensor([[0, 17, 42, 99, 7, 300]])
    lm, ref = OrtCausalLM(result.path), TorchCachedLM(model)
    try:
        torch.testing.assert_close(lm.prefill(prompt), ref.prefill(prompt), atol=1e-3, rtol=0)
        for token in (5, 250, 400):
            step = torch.tensor([token])
            ours, theirs = lm.decode(step), ref.decode(step)
            assert routed[-1].shape == (1, 2) and routed[-1].unique().numel() == 2  # 6 of 8 experts get no token
            torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    finally:
        hook.remove()


def test_dense_option_from_the_cli_gives_the_dense_graph_and_the_same_logits(exported, tiny_checkpoint, tmp_path, capsys):
    _, sparse = exported("deepseek_v3", moe_op=False)
    out = tmp_path / "dense"
    code = main(["export", str(tiny_checkpoint("deepseek_v3")), "-o", str(out), "--dense-experts", "-q"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["quantized_modules"]["routed_experts"] == {EXPERTS: {"experts": 8, "form": "dense"}}
    inputs = _expert_inputs(out / "model.onnx")
    assert len(inputs) == 8 and len({name for name, _ in inputs.values()}) == 1  # every expert on the same rows
    assert onnx_logits_gap(sparse.path, out) <= 1e-5
