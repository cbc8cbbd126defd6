"""QAT: fake quantization equals the PTQ rounding, gradients flow, convert lands in the PTQ artifact."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from dsq.quantize.artifact_save import save_quantized_model
from dsq.core.errors import QuantizationError
from dsq.finetune.qat import (
    FakeQuantExperts, FakeQuantLinear, QATConfig, convert_qat, fake_quant_modules, fake_quantize_ste, prepare_qat,
)
from dsq.quantize.artifact_load import load_artifact
from dsq.quantize import GPTQConfig, PerChannel, PerGroup, QuantExperts, QuantLinear, RTNConfig, WeightScheme, quantize_
from dsq.quantize.primitives import dequantize_weight, quantize_rtn
from dsq.tools.testing import make_tiny_checkpoint, make_tiny_tokenizer

SCHEMES = [WeightScheme(4, PerGroup(32)), WeightScheme(4, PerGroup(32), symmetric=False), WeightScheme(8, PerChannel())]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("qat")
    return {t: make_tiny_checkpoint(t, root / t) for t in ("deepseek_v3", "llama")}


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_fake_quantize_equals_ptq_rounding_bit_for_bit(scheme):
    w = torch.randn(3, 48, 80)  # experts-shaped: (E, out, in) with a ragged last group
    qw = quantize_rtn(w, scheme)
    fq = fake_quantize_ste(w, qw.scale, qw.zero, scheme)
    assert torch.equal(fq, dequantize_weight(qw))


def test_straight_through_gradient_is_identity_inside_the_range():
    scheme = WeightScheme(4, PerGroup(16))
    w = torch.randn(4, 32, requires_grad=True)
    qw = quantize_rtn(w.detach(), scheme)
    fake_quantize_ste(w, qw.scale, qw.zero, scheme).sum().backward()
    assert torch.all(w.grad == 1.0)  # symmetric min/max: nothing is clipped


@pytest.mark.parametrize("model_type", ["deepseek_v3", "llama"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_prepared_model_is_exactly_rtn_at_step_zero(checkpoints, model_type, scheme):
    ref = _model(checkpoints[model_type])
    quantize_(ref, RTNConfig(scheme), progress=False)
    model = _model(checkpoints[model_type])
    names = prepare_qat(model, QATConfig(scheme))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    quantized = {n for n, m in ref.named_modules() if isinstance(m, (QuantLinear, QuantExperts))}
    assert set(names) == quantized
    if model_type == "deepseek_v3":
        assert any(isinstance(m, FakeQuantExperts) for m in model.modules())


@pytest.mark.parametrize("learnable", [False, True])
def test_gradients_reach_latent_weights_experts_and_scales(checkpoints, learnable):
    model = _model(checkpoints["deepseek_v3"]).train()
    prepare_qat(model, QATConfig(WeightScheme(4, PerGroup(32)), learnable_scales=learnable))
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    fakes = fake_quant_modules(model)
    experts = next(m for m in fakes.values() if isinstance(m, FakeQuantExperts))
    assert experts.gate_up_proj.grad is not None and experts.gate_up_proj.grad.abs().sum() > 0
    linear = next(m for m in fakes.values() if isinstance(m, FakeQuantLinear))
    assert linear.weight.grad.abs().sum() > 0
    if learnable:
        assert linear.fq.scale.requires_grad and linear.fq.scale.grad.abs().sum() > 0
    else:
        assert linear.fq.scale is None


def _train_steps(model, steps: int = 3, lr: float = 1e-2) -> None:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        ids = _ids(i)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("learnable", [False, True])
def test_convert_after_training_matches_the_fake_quant_forward_and_saves_like_ptq(checkpoints, tmp_path, learnable):
    scheme = WeightScheme(4, PerGroup(32))
    model = _model(checkpoints["deepseek_v3"])
    initial = copy.deepcopy(model)
    prepare_qat(model, QATConfig(scheme, learnable_scales=learnable))
    _train_steps(model)
    ids = _ids(7)
    with torch.no_grad():
        fake = model(ids).logits
    report = convert_qat(model)
    with torch.no_grad():
        converted = model(ids).logits
    torch.testing.assert_close(converted, fake, atol=1e-5, rtol=0)
    assert not fake_quant_modules(model)
    qmods = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantExperts))]
    assert qmods and all((m.scheme if isinstance(m, QuantLinear) else m.gate_up_proj.scheme) == scheme for m in qmods)
    assert report.method == "qat" and report.quantized_params > 0
    total = sum(p.numel() for p in initial.parameters())
    assert report.quantized_params + report.kept_params == total  # kept_params includes the never-quantizable ones
    with torch.no_grad():
        assert not torch.equal(converted, initial(ids).logits)  # training changed the model
    save_quantized_model(model, make_tiny_tokenizer(), tmp_path)
    reloaded = load_artifact(tmp_path).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, converted, atol=1e-5, rtol=0)


def test_qat_from_a_ptq_result_starts_exactly_at_it(checkpoints):
    scheme = WeightScheme(4, PerGroup(32))
    model = _model(checkpoints["deepseek_v3"])
    calibration = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(1))
    quantize_(model, GPTQConfig(scheme), calibration=calibration, progress=False)
    ids = _ids()
    with torch.no_grad():
        ptq = model(ids).logits
    prepare_qat(model, QATConfig(scheme, learnable_scales=True))
    assert any(isinstance(m, FakeQuantExperts) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ptq, atol=1e-5, rtol=0)
    convert_qat(model)  # untrained: back to the very same integers
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ptq, atol=1e-5, rtol=0)


def test_scheme_mismatch_with_the_ptq_result_is_an_error(checkpoints):
    model = _model(checkpoints["llama"])
    quantize_(model, RTNConfig(WeightScheme(8, PerChannel())), progress=False)
    with pytest.raises(QuantizationError, match="int8 per-channel sym.*int4 group 32"):
        prepare_qat(model, QATConfig(WeightScheme(4, PerGroup(32))))


def test_nothing_to_fake_quantize_and_convert_without_prepare_are_errors(checkpoints):
    from dsq.quantize import TargetSpec

    model = _model(checkpoints["llama"])
    with pytest.raises(QuantizationError, match="no module"):
        prepare_qat(model, QATConfig(targets=TargetSpec(include=("nothing_matches",))))
    with pytest.raises(QuantizationError, match="prepare_qat"):
        convert_qat(model)


def test_a_collapsed_learned_scale_fails_convert_naming_the_tensor(checkpoints):
    model = _model(checkpoints["llama"])
    prepare_qat(model, QATConfig(WeightScheme(4, PerGroup(32)), learnable_scales=True))
    name, module = next(iter(fake_quant_modules(model).items()))
    with torch.no_grad():
        module.fq.scale[0, 0] = float("nan")
    with pytest.raises(QuantizationError, match=name):
        convert_qat(model)


def test_mse_init_starts_learnable_scales_at_the_range_search(checkpoints):
    from dsq.quantize.gptq import static_qparams

    scheme = WeightScheme(4, PerGroup(32))
    model = _model(checkpoints["deepseek_v3"])
    w = model.model.layers[1].mlp.experts.down_proj.detach().clone()  # (E, H, I)
    q_a = model.model.layers[0].self_attn.q_a_proj.weight.detach().clone()
    prepare_qat(model, QATConfig(scheme, learnable_scales=True, mse_init=True))
    experts = model.model.layers[1].mlp.experts
    expected = torch.stack([static_qparams(w[e], scheme, mse=True)[0] for e in range(w.shape[0])])
    assert torch.equal(experts.fq_down.scale.detach(), expected)
    linear = model.model.layers[0].self_attn.q_a_proj
    assert torch.equal(linear.fq.scale.detach(), static_qparams(q_a, scheme, mse=True)[0])
    assert not torch.equal(linear.fq.scale.detach(), quantize_rtn(q_a, scheme).scale)  # the search moved some ranges
    with pytest.raises(QuantizationError, match="mse_init needs learnable_scales"):
        prepare_qat(_model(checkpoints["llama"]), QATConfig(scheme, mse_init=True))
