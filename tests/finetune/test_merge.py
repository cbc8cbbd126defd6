"""Merging LoRA: exact into floating point, dequantize-add-requantize into dsq int4 and bnb NF4, drift."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from dsq.assets import data_file  # noqa: E402
from dsq.core.checkpoint import bundled_model_path  # noqa: E402
from dsq.finetune.lora import LoraSpec, adapted_modules, apply_lora  # noqa: E402
from dsq.eval.drift import MergeDrift, measure_merge_drift  # noqa: E402
from dsq.finetune.merge import (  # noqa: E402
    MergeError,
    merge_into_fp,
    merge_requantize,
)
from dsq.quantize import BnbNF4Config, PerGroup, QuantLinear, RTNConfig, WeightScheme, quantize_  # noqa: E402
from dsq.tools.testing import randomize_lora, tiny_config  # noqa: E402


def tiny_deepseek(kind: str = "fp") -> nn.Module:
    """A random tiny DeepSeek-V3 (hidden 128), floating point or dsq int4 group 32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("deepseek_v3")).eval()
    if kind == "int4":
        quantize_(model, RTNConfig(scheme=WeightScheme(4, PerGroup(32))), progress=False)
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def has_lora_layers(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def random_ids(shape: tuple[int, ...], vocab: int = 512, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the bundled (trained) model


@pytest.fixture(scope="module")
def bundled() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The bundled trained DeepSeek-V3 (4.8M parameters), a training batch and held-out tokens."""
    root = bundled_model_path()
    if not (root / "model.safetensors").is_file():
        pytest.skip("the bundled model is not generated in this tree")
    tokenizer = AutoTokenizer.from_pretrained(root)
    train = tokenizer(data_file("calibration.txt").read_text(encoding="utf-8")[:4000])["input_ids"]
    heldout = tokenizer(data_file("heldout.txt").read_text(encoding="utf-8")[:8000])["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32).eval()
    return model, torch.tensor(train[:128]).reshape(2, 64), torch.tensor(heldout[:1024])


def seeded_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """``apply_lora`` with peft's draw of A from a fixed seed (the global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return apply_lora(model, spec)


def train_adapter(peft_model: nn.Module, batch: torch.Tensor, steps: int = 4, lr: float = 0.5) -> list[float]:
    """A few SGD steps on a fixed batch: a small, real (non-zero) LoRA update."""
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    peft_model.eval()
    return losses


def assert_sane(drift: MergeDrift) -> None:
    assert 0.0 <= drift.top1_agreement <= 1.0
    assert drift.mean_kl >= 0.0 and drift.max_abs_logit_diff >= 0.0
    assert all(map(torch.isfinite, torch.tensor([drift.ppl_adapter, drift.ppl_merged, drift.ppl_increase_pct])))
    assert drift.tokens == 1024


# --------------------------------------------------------------------------- exact merge


def test_merge_into_fp_equals_the_adapter_model():
    model = tiny_deepseek()
    ids = random_ids((2, 32))
    base_logits = logits(model, ids)
    peft_model = apply_lora(model, LoraSpec(r=4, routed_experts=True))
    randomize_lora(peft_model)
    reference = copy.deepcopy(peft_model)
    expected = logits(reference, ids)

    merged = merge_into_fp(peft_model)

    assert type(merged).__name__ == "DeepseekV3ForCausalLM" and not has_lora_layers(merged)
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter does change the model
    assert (logits(merged, ids) - expected).abs().max() <= 1e-5


def test_merge_requantize_on_fp_is_exact_and_records_every_target():
    peft_model = apply_lora(tiny_deepseek(), LoraSpec(r=4, routed_experts=True))
    randomize_lora(peft_model)
    targets = adapted_modules(peft_model)
    ids = random_ids((2, 32))
    expected = logits(copy.deepcopy(peft_model), ids)

    merged, records = merge_requantize(peft_model)

    assert {r.name for r in records} == targets
    assert {r.kind for r in records} == {"linear", "experts"}
    assert all(r.requant_rel_error < 1e-6 and abs(r.delta_retained - 1) < 1e-4 and r.max_abs_delta > 0 for r in records)
    assert (logits(merged, ids) - expected).abs().max() <= 1e-5


def test_merge_into_fp_refuses_a_quantized_base():
    peft_model = apply_lora(tiny_deepseek("int4"), LoraSpec(r=2))
    with pytest.raises(MergeError, match="merge_requantize"):
        merge_into_fp(peft_model)


def test_merging_needs_a_peft_model():
    with pytest.raises(MergeError, match="PeftModel"):
        merge_requantize(tiny_deepseek())


# --------------------------------------------------------------------------- re-quantizing merge


def test_merge_requantize_dsq_int4_keeps_the_scheme_and_the_adapter(bundled):
    model, batch, heldout = copy.deepcopy(bundled[0]), bundled[1], bundled[2]
    quantize_(model, RTNConfig(scheme=WeightScheme(4, PerGroup(32))), progress=False)
    without_adapter = copy.deepcopy(model)
    peft_model = seeded_lora(model, LoraSpec(r=8, alpha=16))
    targets = adapted_modules(peft_model)
    schemes = {n: peft_model.get_base_model().get_submodule(n).get_base_layer().scheme for n in targets}
    losses = train_adapter(peft_model, batch)
    assert losses[-1] < losses[0]
    logits(peft_model, heldout[None, :64])  # an eval forward before merging
    adapter = copy.deepcopy(peft_model)

    merged, records = merge_requantize(peft_model)

    assert not has_lora_layers(merged)
    for name in targets:
        module = merged.get_submodule(name)
        assert type(module) is QuantLinear and module.scheme == schemes[name]
    assert {r.name for r in records} == targets
    assert all(r.kind == "dsq-quant" and r.scheme == schemes[r.name].describe() for r in records)
    assert all(r.max_abs_delta > 0 and 0 < r.requant_rel_error < 0.1 for r in records)
    drift = measure_merge_drift(adapter, merged, heldout, seq_len=128, max_tokens=1024)
    assert_sane(drift)
    assert drift.top1_agreement > 0.9, drift  # measured 0.957 (KL 0.0036 vs 0.0137 without the adapter)
    assert abs(drift.ppl_increase_pct) < 3, drift
    unmerged = measure_merge_drift(adapter, without_adapter, heldout, seq_len=128, max_tokens=1024)
    assert drift.mean_kl < 0.5 * unmerged.mean_kl, (drift, unmerged)  # most of the adapter's effect is kept


@pytest.mark.parametrize("double_quant", [False, True])
def test_merge_requantize_bnb_nf4_after_an_eval_forward(bundled, double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    model, batch, heldout = copy.deepcopy(bundled[0]), bundled[1], bundled[2]
    quantize_(model, BnbNF4Config(double_quant=double_quant), progress=False)
    without_adapter = copy.deepcopy(model)
    peft_model = seeded_lora(model, LoraSpec(r=8, alpha=16))
    targets = adapted_modules(peft_model)
    train_adapter(peft_model, batch)
    adapter = copy.deepcopy(peft_model)
    before = {n: peft_model.get_base_model().get_submodule(n).get_base_layer() for n in targets}
    # The trap: on a CPU with AVX512-BF16 the first eval forward repacks every Linear4bit weight into
    # another layout (and transposes absmax). Force that path here, whatever this host supports.
    for layer in before.values():
        layer.support_avx512bf16_for_cpu = True
    logits(peft_model, heldout[None, :64])
    assert all(layer.weight.quant_state.packing_format_for_cpu for layer in before.values())
    settings = {
        n: (m.weight.quant_type, m.weight.blocksize, m.weight.compress_statistics, m.weight.quant_storage, m.compute_dtype)
        for n, m in before.items()
    }

    merged, records = merge_requantize(peft_model)

    assert not has_lora_layers(merged)
    for name in targets:
        module = merged.get_submodule(name)
        assert type(module) is bnb.nn.Linear4bit
        state = module.weight.quant_state
        assert not getattr(state, "packing_format_for_cpu", False)
        assert (module.weight.quant_type, state.blocksize, module.weight.compress_statistics,
                module.weight.quant_storage, module.compute_dtype) == settings[name]
        assert state.nested == double_quant
    assert {r.name for r in records} == targets and all(r.kind == "bnb-4bit" for r in records)
    assert all(r.scheme.startswith("nf4 block 64") for r in records)
    drift = measure_merge_drift(adapter, merged, heldout, seq_len=128, max_tokens=1024)
    assert_sane(drift)
    assert drift.top1_agreement > 0.9, drift  # measured 0.963; ~0.68 if absmax stays transposed, ~0.01 raw
    unmerged = measure_merge_drift(adapter, without_adapter, heldout, seq_len=128, max_tokens=1024)
    assert drift.mean_kl < 0.5 * unmerged.mean_kl, (drift, unmerged)


@pytest.mark.parametrize(("scale", "kept"), [(1e-4, False), (3.0, True)])
def test_requantization_keeps_large_updates_and_rounds_tiny_ones_away(scale, kept):
    """A base weight sits on its quantization grid: an update far below half a step rounds back to it."""
    peft_model = apply_lora(tiny_deepseek("int4"), LoraSpec(r=2, targets=(r"layers\.0\.self_attn\.o_proj$",)))
    layer = peft_model.get_base_model().get_submodule("model.layers.0.self_attn.o_proj")
    step = layer.get_base_layer().weight_q.scale.float().mean()  # mean quantization step
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(2, 128, generator=torch.Generator().manual_seed(0)))
        layer.lora_B["default"].weight.copy_(torch.randn(128, 2, generator=torch.Generator().manual_seed(1)))
        layer.lora_B["default"].weight.mul_(float(scale * step) / float((layer.get_delta_weight("default")).std()))

    _, [record] = merge_requantize(peft_model)

    assert record.name == "model.layers.0.self_attn.o_proj"
    assert (record.delta_retained > 0.8) if kept else (record.delta_retained < 0.2), record


def test_measure_merge_drift_of_identical_models(bundled):
    model, heldout = bundled[0], bundled[2]
    twin = copy.deepcopy(model)
    model.train()

    drift = measure_merge_drift(model, twin, heldout, seq_len=128, max_tokens=1024)

    assert model.training and not twin.training  # training flags restored
    model.eval()
    assert_sane(drift)
    assert drift.top1_agreement == 1.0 and drift.max_abs_logit_diff == 0.0
    assert abs(drift.mean_kl) < 1e-6 and drift.ppl_adapter == drift.ppl_merged and drift.ppl_increase_pct == 0.0
    fields = {"top1_agreement", "mean_kl", "ppl_adapter", "ppl_merged", "ppl_increase_pct", "max_abs_logit_diff"}
    assert set(drift.to_dict()) >= fields
