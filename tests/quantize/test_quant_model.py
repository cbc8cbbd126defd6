"""Tier 2: quantized modules and whole tiny models; artifacts reload in transformers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsq.quantize.artifact_save import save_quantized_model
from dsq.core.loading import load_checkpoint
from dsq.quantize import (
    PerChannel, PerGroup, QuantExperts, QuantLinear, RTNConfig, TargetSpec, WeightScheme, quantize_, quantize_rtn,
)
from dsq.quantize.modules import GatedActivation
from dsq.quantize.primitives import dequantize_weight
from dsq.eval.reload import transformers_reload_check


def _load(tiny_checkpoint, arch):
    return load_checkpoint(tiny_checkpoint(arch))


def _quantized_artifact(tiny_checkpoint, arch, scheme, out):
    """Load a tiny checkpoint, quantize it with RTN ``scheme`` and save the artifact to ``out``."""
    loaded = _load(tiny_checkpoint, arch)
    quantize_(loaded.model, RTNConfig(scheme), progress=False)
    save_quantized_model(loaded.model, loaded.tokenizer, out)
    return loaded


def test_deepseek_v3_every_linear_and_expert_quantized(tiny_checkpoint):
    loaded = _load(tiny_checkpoint, "deepseek_v3")
    model = loaded.model
    total = sum(p.numel() for p in model.parameters())
    report = quantize_(model, RTNConfig(WeightScheme(4, PerGroup(64))), progress=False)
    layer1 = model.model.layers[1]
    assert isinstance(layer1.mlp.experts, QuantExperts)
    assert isinstance(layer1.mlp.shared_experts.down_proj, QuantLinear)
    for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        assert isinstance(getattr(layer1.self_attn, name), QuantLinear), name
    assert isinstance(model.lm_head, nn.Linear)  # kept by default
    assert not isinstance(layer1.mlp.gate, QuantLinear)  # router stays high precision
    left = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert left == ["lm_head"]
    # the report accounts for every parameter
    assert report.quantized_params + report.kept_params == total
    kept = {m.name: m.reason for m in report.kept}
    assert "lm_head" in kept and "kept" in kept["lm_head"]
    experts = [m for m in report.quantized if m.kind == "experts"]
    assert len(experts) == 1 and experts[0].params == 8 * 3 * 64 * 128


def test_int4_is_packed_two_per_byte(tiny_checkpoint):
    loaded = _load(tiny_checkpoint, "llama")
    linear = loaded.model.model.layers[0].mlp.down_proj  # (128, 256)
    quantize_(loaded.model, RTNConfig(WeightScheme(4, PerGroup(64))), progress=False)
    q = loaded.model.model.layers[0].mlp.down_proj
    assert q.weight_q.packed.dtype == torch.uint8
    assert q.weight_q.packed.shape == (128, 128)
    assert q.weight_q.scale.shape == (128, 4)
    assert linear is not q


def test_quant_linear_forward_is_dequantized_linear():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=True)
    qw = quantize_rtn(lin.weight.detach(), WeightScheme(4, PerGroup(32), symmetric=False))
    q = QuantLinear.from_linear(lin, qw)
    x = torch.randn(3, 5, 96)
    torch.testing.assert_close(q(x), F.linear(x, dequantize_weight(qw), lin.bias))


def test_quant_experts_match_reference_experts(tiny_checkpoint):
    loaded = _load(tiny_checkpoint, "deepseek_v3")
    experts = loaded.model.model.layers[1].mlp.experts
    scheme = WeightScheme(8, PerChannel())
    gu, dn = quantize_rtn(experts.gate_up_proj.detach(), scheme), quantize_rtn(experts.down_proj.detach(), scheme)
    q = QuantExperts(gu, dn, GatedActivation.of(experts), torch.float32)
    with torch.no_grad():
        experts.gate_up_proj.copy_(dequantize_weight(gu))
        experts.down_proj.copy_(dequantize_weight(dn))
    torch.manual_seed(0)
    h = torch.randn(10, 128)
    idx = torch.randint(0, 8, (10, 2))
    w = torch.rand(10, 2)
    with torch.no_grad():
        torch.testing.assert_close(q(h, idx, w), experts(h, idx, w), atol=1e-5, rtol=1e-5)


def test_include_exclude_patterns(tiny_checkpoint):
    loaded = _load(tiny_checkpoint, "qwen2")
    spec = TargetSpec(include=(r"mlp",), exclude=(r"layers\.1\.",), lm_head=True)
    report = quantize_(loaded.model, RTNConfig(WeightScheme(8, PerChannel()), spec), progress=False)
    names = {m.name for m in report.quantized}
    assert names == {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"}
    reasons = {m.name: m.reason for m in report.kept}
    assert "excluded by pattern" in reasons["model.layers.1.mlp.up_proj"]
    assert "include" in reasons["model.layers.0.self_attn.q_proj"]
    assert reasons["lm_head"] == "not matched by include patterns"  # lm_head: true alone does not select it
    with pytest.raises(ValueError, match="invalid module pattern"):
        TargetSpec(include=("(",))


RELOAD_CASES = [
    ("deepseek_v3", WeightScheme(8, PerChannel())),
    ("deepseek_v3", WeightScheme(4, PerGroup(64))),
    ("deepseek_v3", WeightScheme(4, PerGroup(128))),  # kv_b_proj is 64 wide: one group per row
    ("deepseek_v3", WeightScheme(4, PerGroup(48))),  # ragged last group everywhere
    ("deepseek_v2", WeightScheme(4, PerGroup(32))),
    ("llama", WeightScheme(8, PerGroup(64), symmetric=False)),
    ("qwen2", WeightScheme(8, PerChannel())),
    ("qwen2", WeightScheme(4, PerGroup(64))),
]


@pytest.mark.parametrize("arch,scheme", RELOAD_CASES, ids=lambda v: getattr(v, "describe", lambda: v)())
def test_transformers_reload_matches_dsq_forward(tiny_checkpoint, tmp_path, arch, scheme):
    loaded = _quantized_artifact(tiny_checkpoint, arch, scheme, tmp_path)
    check = transformers_reload_check(tmp_path, loaded.model)
    assert check.loaded, check.reason
    assert check.max_abs_diff <= 1e-4, check.max_abs_diff


@pytest.mark.parametrize("arch", ["deepseek_v3", "llama"])
def test_asymmetric_int4_reloads_or_the_expert_gap_is_reported(tiny_checkpoint, tmp_path, arch):
    """Dense asymmetric int4 reloads in transformers; DeepSeek's asymmetric experts cannot be read by
    transformers <= 5.25 (their zero points are never collected): reported, never hidden."""
    loaded = _load(tiny_checkpoint, arch)
    quantize_(loaded.model, RTNConfig(WeightScheme(4, PerGroup(64), symmetric=False)), progress=False)
    save_quantized_model(loaded.model, loaded.tokenizer, tmp_path)
    check = transformers_reload_check(tmp_path, loaded.model)
    if arch == "llama":
        assert check.passed, (check.reason, check.max_abs_diff)
    elif check.loaded:  # a transformers that reads them must then read them right
        assert check.passed, check.max_abs_diff
    else:
        assert not check.passed and "zero_point" in check.reason and "experts" in check.reason, check.reason


@pytest.mark.parametrize("scheme", [
    WeightScheme(4, PerGroup(32), symmetric=False),
    WeightScheme(4, PerChannel(), symmetric=False),
    WeightScheme(4, PerGroup(64)),
    WeightScheme(8, PerGroup(32), symmetric=False),
])
def test_compressed_tensors_decompressor_reads_our_tensors(scheme):
    """compressed-tensors' own decompressor gives back dsq's dequantized weight exactly."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from dsq.quantize.compressed_tensors_format import compress_tensor, weight_args
    from dsq.quantize.modules import QuantTensor

    torch.manual_seed(0)
    w = torch.randn(72, 128)
    qw = quantize_rtn(w, scheme)
    qt = QuantTensor(qw)
    tensors = compress_tensor("x", qt, packed_format=True)
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=weight_args(scheme, 128), format="pack-quantized")
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    state = {k.removeprefix("x."): v for k, v in tensors.items()}
    out = compressor.decompress(state, ct_scheme)
    torch.testing.assert_close(out["weight"], dequantize_weight(qw), atol=0, rtol=0)


LOAD_CASES = [
    ("deepseek_v3", WeightScheme(4, PerGroup(64), symmetric=False)),
    ("deepseek_v3", WeightScheme(8, PerChannel(), symmetric=False)),
    ("deepseek_v3", WeightScheme(4, PerGroup(48))),
    ("llama", WeightScheme(4, PerGroup(32), symmetric=False)),
    ("qwen2", WeightScheme(8, PerGroup(64))),
]


@pytest.mark.parametrize("arch,scheme", LOAD_CASES, ids=lambda v: getattr(v, "describe", lambda: v)())
def test_dsq_load_artifact_is_exact(tiny_checkpoint, tmp_path, arch, scheme):
    """dsq reads back every scheme it writes, bit for bit (asymmetric int4 included)."""
    from dsq.quantize.artifact_load import load_artifact
    from dsq.eval.reload import logits_of, probe_ids

    loaded = _quantized_artifact(tiny_checkpoint, arch, scheme, tmp_path)
    back = load_artifact(tmp_path).model
    ids = probe_ids(loaded.model.config.vocab_size)
    assert torch.equal(logits_of(back, ids), logits_of(loaded.model, ids))
    mods = {n: type(m).__name__ for n, m in back.named_modules() if isinstance(m, (QuantLinear, QuantExperts))}
    expected = {n: type(m).__name__ for n, m in loaded.model.named_modules() if isinstance(m, (QuantLinear, QuantExperts))}
    assert mods == expected
