"""Batched GPTQ: a stack of weights solved together gives each weight the integers it gets alone."""
from __future__ import annotations

import copy

import pytest
import torch

from dsq.core.errors import QuantizationError
from dsq.core.loading import load_checkpoint
from dsq.quantize import GPTQConfig, PerChannel, PerGroup, QuantExperts, WeightScheme, quantize_
from dsq.quantize.gptq import HessianNotPositiveDefinite, gptq_quantize, gptq_quantize_batched
from dsq.quantize.primitives import dequantize_weight, quantize_rtn
from dsq.tools.testing import hessian_of

SCHEMES = [
    WeightScheme(4, PerGroup(32)),
    WeightScheme(4, PerGroup(40), symmetric=False),  # ragged last group (96 = 2 x 40 + 16)
    WeightScheme(8, PerChannel()),
    WeightScheme(4, PerChannel(), symmetric=False),
]


def _stack(count: int = 6, out: int = 24, inp: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``(count, out, inp)`` and their own Hessians, with one dead input column in stack entry 2."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(count, out, inp, generator=g)
    hessians = []
    for _ in range(count):
        x = torch.randn(200, inp, generator=g) * torch.rand(inp, generator=g) * 3
        hessians.append(hessian_of(x))
    stacked = torch.stack(hessians)
    stacked[2, 5, :] = 0
    stacked[2, :, 5] = 0
    return weights, stacked


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("mse_scales", [True, False])
def test_batched_equals_one_weight_at_a_time(scheme, act_order, mse_scales):
    weights, hessians = _stack()
    kwargs = dict(act_order=act_order, mse_scales=mse_scales, block_size=32)
    batched = gptq_quantize_batched(weights, hessians, scheme, **kwargs)
    assert len(batched) == weights.shape[0]
    for b in range(weights.shape[0]):
        alone = gptq_quantize(weights[b], hessians[b], scheme, **kwargs)
        assert torch.equal(batched[b].qweight.qweight, alone.qweight.qweight), b
        assert torch.equal(batched[b].qweight.scale, alone.qweight.scale), b
        if not scheme.symmetric:
            assert torch.equal(batched[b].qweight.zero, alone.qweight.zero), b
        assert batched[b].loss == pytest.approx(alone.loss, rel=1e-5)
    # the dead input column is zero in stack entry 2 only
    assert (batched[2].qweight.qweight[:, 5] == (batched[2].qweight.zero[:, 0] if not scheme.symmetric else 0)).all()


def test_batched_result_does_not_depend_on_the_stack_it_is_in():
    weights, hessians = _stack(count=8)
    scheme = WeightScheme(4, PerGroup(32))
    whole = gptq_quantize_batched(weights, hessians, scheme, act_order=True)
    halves = gptq_quantize_batched(weights[5:], hessians[5:], scheme, act_order=True)
    for b, result in enumerate(halves, start=5):
        assert torch.equal(result.qweight.qweight, whole[b].qweight.qweight)


def test_batched_gptq_rounds_better_than_rtn_on_its_inputs():
    weights, hessians = _stack(count=4)
    scheme = WeightScheme(4, PerGroup(32))
    for b, result in enumerate(gptq_quantize_batched(weights, hessians, scheme, act_order=True)):
        def proxy(w_hat):  # tr((W - W_hat) H (W - W_hat)^T): the output error on the inputs
            d = weights[b] - w_hat
            return float(torch.einsum("oi,ij,oj->", d, hessians[b], d))

        assert proxy(dequantize_weight(result.qweight)) < proxy(dequantize_weight(quantize_rtn(weights[b], scheme)))


def test_an_indefinite_hessian_names_its_stack_entry():
    weights, hessians = _stack(count=3)
    hessians[1] = -torch.eye(hessians.shape[-1])  # negative definite: no damping rescues it
    with pytest.raises(HessianNotPositiveDefinite) as info:
        gptq_quantize_batched(weights, hessians, WeightScheme(4, PerGroup(32)))
    assert info.value.index == 1


def test_gptq_expert_chunk_gives_the_same_artifact_as_one_expert_at_a_time(tiny_deepseek_v3):
    """The whole pipeline: experts solved one by one (``expert_chunk=1``, the per-expert loop) and batched."""
    model = load_checkpoint(tiny_deepseek_v3).model
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(5))
    scheme = WeightScheme(4, PerGroup(32))
    results = []
    for chunk in (1, 3, 64):
        m = copy.deepcopy(model)
        report = quantize_(m, GPTQConfig(scheme, batch_size=4, expert_chunk=chunk), calibration=ids, progress=False)
        results.append((dict(m.state_dict()), report))
    (reference, report1), *others = results
    assert any(isinstance(m, QuantExperts) for m in model.modules()) is False  # the fp model is untouched
    assert any(".experts.0." in name for name in report1.calibration["modules"])
    for state, report in others:
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(state[key], value), key
        assert report.calibration["modules"].keys() == report1.calibration["modules"].keys()


def test_gptq_names_the_weight_whose_hessian_fails(tiny_deepseek_v3, monkeypatch):
    """Same-shape Linears are solved together (layer 0's dense gate_proj and up_proj); a failure names the one."""
    import dsq.quantize.methods.gptq as gptq_method

    real = gptq_method.gptq_quantize_batched

    def failing(weights, hessians, scheme, **kwargs):
        if weights.shape[0] > 1:  # the first stack of several weights: its second one fails
            raise HessianNotPositiveDefinite(1)
        return real(weights, hessians, scheme, **kwargs)

    monkeypatch.setattr(gptq_method, "gptq_quantize_batched", failing)
    model = load_checkpoint(tiny_deepseek_v3).model
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    with pytest.raises(QuantizationError, match=r"^model\.layers\.0\.mlp\.up_proj: GPTQ failed.*stack entry 1"):
        quantize_(model, GPTQConfig(WeightScheme(4, PerGroup(32)), batch_size=2), calibration=ids, progress=False)


def test_expert_chunk_must_be_positive():
    with pytest.raises(ValueError, match="expert_chunk"):
        GPTQConfig(expert_chunk=0)
