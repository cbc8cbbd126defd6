"""compressed-tensors zero-point layouts: every scheme reloads in transformers and in dsq, old artifacts too."""
import math

import pytest
import torch
from safetensors.torch import load_file

from dsq.quantize.artifact_save import save_quantized_model
from dsq.quantize.artifact_check import check_quantized_tensors, parse_quantization_config, read_tensor_specs
from dsq.core.checkpoint import inspect_checkpoint
from dsq.core.loading import load_checkpoint
from dsq.core.errors import CheckpointError
from dsq.quantize.artifact_load import load_artifact
from dsq.quantize import PerChannel, PerGroup, QuantExperts, QuantLinear, RTNConfig, WeightScheme, quantize_
from dsq.quantize import compressed_tensors_format as ctf
from dsq.quantize.compressed_tensors_format import ZeroPointLayout, zero_point_bytes, zero_point_layout
from dsq.eval.reload import TOLERANCE, logits_of, probe_ids, transformers_reload_check

ARCHS = ["llama", "qwen2", "deepseek_v2", "deepseek_v3"]
SCHEMES = [
    WeightScheme(4, PerGroup(32)),
    WeightScheme(4, PerGroup(32), symmetric=False),
    WeightScheme(4, PerChannel(), symmetric=False),
    WeightScheme(8, PerGroup(32), symmetric=False),
    WeightScheme(8, PerChannel()),
]
RAGGED = WeightScheme(4, PerGroup(48), symmetric=False)  # 128 and 256 wide rows: compressed-tensors 'block'


def _artifact(tiny_checkpoint, arch, scheme, out):
    loaded = load_checkpoint(tiny_checkpoint(arch))
    quantize_(loaded.model, RTNConfig(scheme), progress=False)
    save_quantized_model(loaded.model, loaded.tokenizer, out)
    return loaded.model


def _assert_dsq_reads_exactly(out, model):
    back = load_artifact(out).model
    ids = probe_ids(model.config.vocab_size)
    assert torch.equal(logits_of(back, ids), logits_of(model, ids))
    kinds = (QuantLinear, QuantExperts)
    assert ({n for n, m in back.named_modules() if isinstance(m, kinds)}
            == {n for n, m in model.named_modules() if isinstance(m, kinds)})


CASES = [(a, s) for a in ARCHS for s in SCHEMES] + [("llama", RAGGED), ("deepseek_v3", RAGGED)]


@pytest.mark.parametrize("arch,scheme", CASES, ids=lambda v: getattr(v, "describe", lambda: v)())
def test_every_scheme_reloads_in_transformers_and_dsq(tiny_checkpoint, tmp_path, arch, scheme):
    model = _artifact(tiny_checkpoint, arch, scheme, tmp_path)
    check = transformers_reload_check(tmp_path, model)
    asym_experts = [n for n, m in model.named_modules() if isinstance(m, QuantExperts) and not scheme.symmetric]
    if asym_experts and not check.loaded:
        # transformers' fused-expert loader drops weight_zero_point (a failed load, or a load without them for
        # the ragged 'block' strategy): reported precisely, naming the modules
        assert not check.passed
        assert "weight_zero_point" in check.reason and "47430" in check.reason, check.reason
        assert all(name in check.reason for name in asym_experts), check.reason
    else:
        assert check.loaded, check.reason
        assert check.max_abs_diff <= TOLERANCE, check.max_abs_diff
    _assert_dsq_reads_exactly(tmp_path, model)


def test_zero_point_written_in_the_installed_layout(tiny_checkpoint, tmp_path):
    """Shapes and bytes of the zero points as written (and as the plan counts them)."""
    _artifact(tiny_checkpoint, "llama", WeightScheme(4, PerGroup(32), symmetric=False), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    layout = ctf.installed_zero_point_layout()
    zero = tensors["model.layers.0.self_attn.k_proj.weight_zero_point"]  # k_proj: [64, 128], 4 groups
    rows = 64 if layout is ZeroPointLayout.ROW_PADDED else 8
    assert zero.dtype == torch.int32 and tuple(zero.shape) == (rows, 4)
    assert zero.numel() * 4 == zero_point_bytes(64, 128, WeightScheme(4, PerGroup(32), symmetric=False), True)


@pytest.mark.parametrize("version,layout", [
    ("0.20.1", ZeroPointLayout.ROW_PADDED), ("0.21.0", ZeroPointLayout.ROW_PADDED), ("1.0", ZeroPointLayout.ROW_PADDED),
    ("0.19.0", ZeroPointLayout.PACKED), ("0.12.2", ZeroPointLayout.PACKED), ("0.20.0rc1", ZeroPointLayout.ROW_PADDED),
])
def test_layout_follows_compressed_tensors_version(version, layout):
    assert zero_point_layout(version) is layout


@pytest.mark.parametrize("scheme,packed,expected", [
    (WeightScheme(4, PerGroup(32), symmetric=False), True, {ZeroPointLayout.ROW_PADDED: 4 * 72 * 4, ZeroPointLayout.PACKED: 4 * 9 * 4}),
    (WeightScheme(8, PerChannel(), symmetric=False), True, {ZeroPointLayout.ROW_PADDED: 4 * 72, ZeroPointLayout.PACKED: 4 * 18}),
    (WeightScheme(8, PerChannel(), symmetric=False), False, {ZeroPointLayout.ROW_PADDED: 72, ZeroPointLayout.PACKED: 72}),
    (WeightScheme(4, PerGroup(48), symmetric=False), True, {ZeroPointLayout.ROW_PADDED: 72 * 3, ZeroPointLayout.PACKED: 72 * 3}),
    (WeightScheme(4, PerGroup(32)), True, {ZeroPointLayout.ROW_PADDED: 0, ZeroPointLayout.PACKED: 0}),
])
def test_zero_point_bytes_of_each_layout(scheme, packed, expected):
    """[72, 128] matrix: row-padded int32, packed int32, int8 (int-quantized and ragged 'block'), none."""
    for layout, nbytes in expected.items():
        assert zero_point_bytes(72, 128, scheme, packed, layout) == nbytes


@pytest.mark.parametrize("arch,scheme", [
    ("llama", WeightScheme(4, PerGroup(32), symmetric=False)),
    ("deepseek_v3", WeightScheme(4, PerChannel(), symmetric=False)),
    ("deepseek_v3", WeightScheme(8, PerGroup(32), symmetric=False)),  # 8-bit packed: the model has experts
])
def test_old_packed_layout_still_reads(tiny_checkpoint, tmp_path, monkeypatch, arch, scheme):
    """Artifacts of earlier dsq versions (zero points packed to [ceil(out*bits/32), groups]) pass the checks and load."""
    monkeypatch.setattr(ctf, "installed_zero_point_layout", lambda: ZeroPointLayout.PACKED)
    model = _artifact(tiny_checkpoint, arch, scheme, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight_zero_point"  # o_proj: [128, *]
    groups = scheme.granularity.num_groups(tensors[name.replace("zero_point", "shape")][1].item())
    assert tuple(tensors[name].shape) == (math.ceil(128 * scheme.bits / 32), groups)
    _assert_dsq_reads_exactly(tmp_path, model)


def test_zero_point_of_no_known_layout_is_named(tiny_checkpoint, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    _artifact(tiny_checkpoint, "llama", WeightScheme(4, PerGroup(32), symmetric=False), tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.0.self_attn.k_proj.weight_zero_point"
    tensors[name] = torch.zeros(16, 4, dtype=torch.int32)  # neither 64 (row-padded) nor 8 (packed) rows
    save_file(tensors, str(path), metadata={"format": "pt"})
    files = inspect_checkpoint(tmp_path)
    groups = parse_quantization_config(files.config["quantization_config"], tmp_path / "config.json")
    config = AutoConfig.from_pretrained(str(tmp_path))
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    expected = r"expected I8 \[64, 4\] or I32 \[64, 4\] or I32 \[8, 4\]"
    with pytest.raises(CheckpointError, match=rf"tensor {name} is I32 \[16, 4\], {expected}"):
        check_quantized_tensors(model, groups, read_tensor_specs(files.weight_files), tmp_path)
    with pytest.raises(CheckpointError, match=name):
        load_artifact(tmp_path)
