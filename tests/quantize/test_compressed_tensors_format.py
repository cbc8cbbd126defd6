"""dsq's compressed-tensors tensors and config against the compressed-tensors library itself.

Words are read back with the library's ``unpack_from_int32`` (and the library's own words are read
by dsq); the ``quantization_config`` is what ``QuantizationConfig.model_validate`` accepts and gives
back unchanged, and equals the config of earlier dsq artifacts once the library has read both.
"""
import sys

import pytest
import torch
from compressed_tensors.compressors import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from torch import nn

from dsq.quantize import compressed_tensors_format as ctf
from dsq.quantize.compressed_tensors_format import ZeroPointLayout, compress_model, compress_tensor, decompress_tensor
from dsq.quantize.modules import QuantExperts, QuantLinear, QuantTensor
from dsq.quantize.primitives import pack_int4, quantize_rtn
from dsq.quantize.scheme import PerChannel, PerGroup, WeightScheme
from dsq.quantize.w8a8 import WEIGHT_SCHEME, DynamicPerToken, StaticPerTensor, W8A8Linear

WIDTHS = [1, 7, 8, 9, 33, 96]  # ragged last words (4-bit: 8 values a word, 8-bit: 4) and whole ones


def _quantized(out: int, in_features: int, scheme: WeightScheme, seed: int = 0):
    torch.manual_seed(seed)
    return quantize_rtn(torch.randn(out, in_features), scheme)


def _asym(bits: int) -> WeightScheme:
    return WeightScheme(bits, PerGroup(8), symmetric=False)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("in_features", WIDTHS)
def test_weight_words_unpack_with_compressed_tensors(bits, in_features):
    qw = _quantized(5, in_features, WeightScheme(bits, PerChannel()))
    words = compress_tensor("x", QuantTensor(qw), packed_format=True)["x.weight_packed"]
    assert words.dtype == torch.int32 and tuple(words.shape) == (5, -(-in_features * bits // 32))
    assert torch.equal(unpack_from_int32(words, bits, torch.Size([5, in_features])), qw.qweight)
    if in_features % (32 // bits) == 0:  # no pad bits: the library's own packing, word for word
        assert torch.equal(words, pack_to_int32(qw.qweight, bits))


@pytest.mark.parametrize("bits,pad_value", [(4, 0), (8, 8)])
def test_pad_bits_are_0x88_bytes(bits, pad_value):
    """The unused bits of a row's last word hold 0x88 bytes, as in every artifact dsq has written."""
    qw = _quantized(3, 9, WeightScheme(bits, PerChannel()))
    words = compress_tensor("x", QuantTensor(qw), packed_format=True)["x.weight_packed"]
    whole = unpack_from_int32(words, bits, torch.Size([3, words.shape[1] * 32 // bits]))
    assert torch.equal(whole[:, :9], qw.qweight)
    assert (whole[:, 9:] == pad_value).all()


def test_row_blocks_give_the_same_words(monkeypatch):
    qw = _quantized(37, 96, WeightScheme(4, PerGroup(32), symmetric=False))
    whole = compress_tensor("x", QuantTensor(qw), packed_format=True)
    monkeypatch.setattr(ctf, "_BLOCK_VALUES", 200)  # two rows of 96 values per library call
    blocks = compress_tensor("x", QuantTensor(qw), packed_format=True)
    assert all(torch.equal(whole[k], blocks[k]) for k in whole)
    assert torch.equal(decompress_tensor(blocks, "x", qw.scheme).qweight, qw.qweight)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layout", list(ZeroPointLayout))
@pytest.mark.parametrize("out", [13, 64, 72])
def test_zero_points_unpack_with_compressed_tensors(bits, layout, out):
    qw = _quantized(out, 32, _asym(bits))
    zero = compress_tensor("x", QuantTensor(qw), packed_format=True, zero_layout=layout)["x.weight_zero_point"]
    rows = out if layout is ZeroPointLayout.ROW_PADDED else -(-out * bits // 32)
    assert zero.dtype == torch.int32 and tuple(zero.shape) == (rows, 4)
    assert torch.equal(unpack_from_int32(zero, bits, torch.Size([out, 4]), packed_dim=0), qw.zero)
    if layout is ZeroPointLayout.PACKED and out % (32 // bits) == 0:  # what the library's compressor writes
        assert torch.equal(zero, pack_to_int32(qw.zero, bits, packed_dim=0))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out", [1, 5, 8, 13])
def test_dsq_reads_the_library_words(bits, out):
    """Including one word per group (``out <= 32/bits``), which compressed-tensors 0.20 cannot unpack along dim 0."""
    qw = _quantized(out, 24, _asym(bits))
    tensors = {
        "x.weight_packed": pack_to_int32(qw.qweight, bits),
        "x.weight_shape": torch.tensor([out, 24]),
        "x.weight_scale": qw.scale,
        "x.weight_zero_point": pack_to_int32(qw.zero, bits, packed_dim=0),
    }
    back = decompress_tensor(tensors, "x", qw.scheme)
    assert torch.equal(back.qweight, qw.qweight) and torch.equal(back.zero, qw.zero)


@pytest.mark.skipif(sys.byteorder != "little", reason="pack_int4 bytes are the format's words on little-endian hosts")
@pytest.mark.parametrize("in_features", [8, 13, 96])
def test_pack_int4_bytes_are_the_format_words(in_features):
    """dsq's in-memory int4 bytes (pack_int4) read as int32 words unpack with the library."""
    qw = _quantized(4, in_features, WeightScheme(4, PerChannel()))
    packed = pack_int4(qw.qweight)  # [4, ceil(in/2)]
    padded = torch.nn.functional.pad(packed, (0, (-packed.shape[1]) % 4), value=0x88)
    words = padded.contiguous().view(torch.int32)
    assert torch.equal(unpack_from_int32(words, 4, torch.Size([4, in_features])), qw.qweight)


class _Model(nn.Module):
    """One module of every kind dsq writes, plus an unquantized Linear (ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self.g32_asym = QuantLinear(_quantized(16, 64, WeightScheme(4, PerGroup(32), symmetric=False)), None, torch.float32)
        self.ragged = QuantLinear(_quantized(16, 64, WeightScheme(4, PerGroup(48), symmetric=False)), None, torch.float32)
        self.int8 = QuantLinear(_quantized(16, 64, WeightScheme(8, PerChannel())), torch.zeros(16), torch.float32)
        self.dynamic = W8A8Linear(_quantized(16, 64, WEIGHT_SCHEME), None, DynamicPerToken())
        self.static = W8A8Linear(_quantized(16, 64, WEIGHT_SCHEME), None, StaticPerTensor(), torch.tensor(0.5))
        self.plain = nn.Linear(64, 16)


class _MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        scheme = WeightScheme(4, PerGroup(32))
        gate_up = quantize_rtn(torch.randn(2, 32, 64), scheme)  # (E, 2I, H)
        down = quantize_rtn(torch.randn(2, 64, 16), scheme)  # (E, H, I): 16 columns, written per channel
        self.experts = QuantExperts(gate_up, down, nn.SiLU(), torch.float32)
        self.int8 = QuantLinear(_quantized(16, 64, WeightScheme(8, PerChannel())), None, torch.float32)


@pytest.mark.parametrize("model_type", [_Model, _MoE])
def test_config_is_what_compressed_tensors_validates(model_type):
    config = compress_model(model_type(), "9.9").quantization_config
    assert config["producer"] == {"name": "dsq", "version": "9.9"}
    parsed = QuantizationConfig.model_validate(config)
    assert {**parsed.model_dump(mode="json"), "producer": config["producer"]} == config


def test_config_groups_of_every_module_kind():
    config = compress_model(_Model(), "9.9").quantization_config
    groups = QuantizationConfig.model_validate(config).config_groups
    by_target = {target: group for group in groups.values() for target in group.targets}
    assert set(by_target) == {f"re:^{n}$" for n in ("g32_asym", "ragged", "int8", "dynamic", "static")}
    assert config["ignore"] == ["plain"] and config["format"] == "mixed-precision"
    ragged = by_target["re:^ragged$"].weights
    assert (ragged.strategy, ragged.block_structure, ragged.symmetric) == ("block", [1, 48], False)
    assert by_target["re:^g32_asym$"].format == "pack-quantized" and by_target["re:^int8$"].format == "int-quantized"
    dynamic, static = by_target["re:^dynamic$"].input_activations, by_target["re:^static$"].input_activations
    assert (dynamic.strategy, dynamic.dynamic) == ("token", True)
    assert (static.strategy, static.dynamic, static.observer) == ("tensor", False, "minmax")


EARLIER_ARGS = {  # weight and input args as earlier dsq versions wrote them into config.json
    "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 32, "num_bits": 4,
                "observer": "minmax", "strategy": "group", "symmetric": False, "type": "int"},
    "block": {"actorder": None, "block_structure": [1, 48], "dynamic": False, "group_size": None, "num_bits": 4,
              "observer": "minmax", "strategy": "block", "symmetric": False, "type": "int"},
    "token": {"actorder": None, "block_structure": None, "dynamic": True, "group_size": None, "num_bits": 8,
              "observer": None, "strategy": "token", "symmetric": True, "type": "int"},
    "tensor": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
               "observer": "minmax", "strategy": "tensor", "symmetric": True, "type": "int"},
}


@pytest.mark.parametrize("name,args", [
    ("weights", ctf.weight_args(WeightScheme(4, PerGroup(32), symmetric=False), 64)),
    ("block", ctf.weight_args(WeightScheme(4, PerGroup(48), symmetric=False), 64)),
    ("token", ctf.input_args(DynamicPerToken())),
    ("tensor", ctf.input_args(StaticPerTensor())),
])
def test_args_equal_those_of_earlier_artifacts(name, args):
    assert QuantizationArgs.model_validate(EARLIER_ARGS[name]) == args
