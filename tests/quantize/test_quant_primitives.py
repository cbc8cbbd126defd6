"""Tier 1: bit-exact primitives and round-trip properties."""
import pytest
import torch

from dsq.quantize import PerChannel, PerGroup, WeightScheme, dequantize_weight, pack_int4, quantize_rtn, sqnr_db, unpack_int4
from dsq.quantize.primitives import compute_qparams


def reference_rtn(w: torch.Tensor, bits: int, group: int | None, symmetric: bool) -> torch.Tensor:
    """Straightforward per-row / per-group loop, the definition the vectorised code must match."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    out = torch.empty_like(w)
    width = group or w.shape[1]
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], width):
            g = w[r, start : start + width].double()
            if symmetric:
                s = max(g.abs().max().item() / qmax, torch.finfo(torch.float32).tiny)
                q = torch.clamp(torch.round(g / s), qmin, qmax)
                out[r, start : start + width] = (q * s).float()
            else:
                lo, hi = min(g.min().item(), 0.0), max(g.max().item(), 0.0)
                s = max((hi - lo) / (qmax - qmin), torch.finfo(torch.float32).tiny)
                z = min(max(qmin - round(lo / s), qmin), qmax)
                q = torch.clamp(torch.round(g / s) + z, qmin, qmax)
                out[r, start : start + width] = ((q - z) * s).float()
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [None, 16, 24])  # 24 does not divide 64: ragged last group
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_matches_reference(bits, group, symmetric):
    torch.manual_seed(0)
    w = torch.randn(12, 64)
    gran = PerChannel() if group is None else PerGroup(group)
    got = dequantize_weight(quantize_rtn(w, WeightScheme(bits, gran, symmetric)))
    torch.testing.assert_close(got, reference_rtn(w, bits, group, symmetric), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_integers_in_range_and_requantize_idempotent(symmetric):
    torch.manual_seed(1)
    scheme = WeightScheme(4, PerGroup(32), symmetric)
    qw = quantize_rtn(torch.randn(8, 96) * 3, scheme)
    assert qw.qweight.dtype == torch.int8
    assert int(qw.qweight.min()) >= -8 and int(qw.qweight.max()) <= 7
    w1 = dequantize_weight(qw)
    w2 = dequantize_weight(quantize_rtn(w1, scheme))
    torch.testing.assert_close(w1, w2, atol=1e-6, rtol=1e-5)


def test_pack_int4_roundtrip_and_layout():
    q = torch.randint(-8, 8, (5, 7), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 4)
    assert torch.equal(unpack_int4(packed, 7), q)
    # element 0 in the low nibble, element 1 in the high nibble, offset by 8
    assert int(packed[0, 0]) == (int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4)


def test_experts_leading_dim_matches_per_expert():
    torch.manual_seed(2)
    w = torch.randn(4, 16, 64)
    scheme = WeightScheme(4, PerGroup(32), True)
    fused = dequantize_weight(quantize_rtn(w, scheme))
    for e in range(4):
        torch.testing.assert_close(fused[e], dequantize_weight(quantize_rtn(w[e], scheme)))


def test_quality_bounds():
    torch.manual_seed(3)
    w = torch.randn(256, 256)
    s8 = sqnr_db(w, dequantize_weight(quantize_rtn(w, WeightScheme(8, PerChannel()))))
    s4 = sqnr_db(w, dequantize_weight(quantize_rtn(w, WeightScheme(4, PerGroup(128)))))
    s4g32 = sqnr_db(w, dequantize_weight(quantize_rtn(w, WeightScheme(4, PerGroup(32)))))
    assert s8 > 38  # ~6 dB per bit
    assert 14 < s4 < s4g32  # smaller groups are more accurate


def test_zero_weight_row_gets_finite_scale():
    w = torch.zeros(2, 64)
    scale, zero = compute_qparams(w, WeightScheme(4, PerGroup(32), False))
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(dequantize_weight(quantize_rtn(w, WeightScheme(4, PerGroup(32), False))), w)


def test_scheme_validation_lists_allowed():
    with pytest.raises(ValueError, match=r"\(4, 8\)"):
        WeightScheme(bits=3)
    with pytest.raises(ValueError, match="group size"):
        PerGroup(0)
