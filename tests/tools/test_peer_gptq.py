"""benchmarks/peer_gptq.py: the shared model shape, token windows and the one quality scorer of every row."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "peer_gptq.py"
_SPEC = importlib.util.spec_from_file_location("peer_gptq", _SCRIPT)
peer = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = peer  # dataclasses look their module up
_SPEC.loader.exec_module(peer)


def test_default_intermediate_is_a_whole_number_of_groups_near_llamas_ratio():
    assert peer.default_intermediate(768) == 2176  # 2112 rounded up to 17 x 128
    assert peer.default_intermediate(1024) == 2816  # exactly 2.75 x 1024
    for hidden in (512, 640, 896):
        got = peer.default_intermediate(hidden)
        assert got % 128 == 0 and 2.75 * hidden <= got < 2.75 * hidden + 128


@pytest.mark.parametrize("fields, needle", [
    (dict(hidden=768, heads=10), "multiple of heads"),
    (dict(hidden=768, intermediate=2112), "intermediate 2112"),
    (dict(hidden=768, heads=12, kv_heads=1), "k/v projection width 64"),
])
def test_model_shape_refuses_shapes_with_ragged_groups(fields, needle):
    base = dict(arch=peer.Arch.LLAMA, hidden=768, layers=2, intermediate=2176, vocab=1024, heads=12, kv_heads=4)
    with pytest.raises(ValueError, match=needle):
        peer.ModelShape(**(base | fields))


def test_token_windows_are_consecutive_and_refuse_short_text_naming_it():
    ids = torch.arange(100)
    windows = peer.token_windows(ids, 3, 10, "x.txt")
    assert windows.dtype == torch.int64 and windows.shape == (3, 10)
    assert torch.equal(windows.flatten(), torch.arange(30))
    with pytest.raises(ValueError, match=r"x\.txt has 100 tokens, fewer than 11 x 10"):
        peer.token_windows(ids, 11, 10, "x.txt")


def test_score_is_zero_kl_full_agreement_for_identical_logits_and_exact_perplexity():
    ids = torch.tensor([[0, 1, 2, 3]])
    logits = torch.zeros(1, 4, 4)  # uniform over 4 tokens: perplexity exactly 4
    quality = peer.score(logits, logits.clone(), ids)
    assert quality.mean_kl == pytest.approx(0.0, abs=1e-12)
    assert quality.top1_agreement == 1.0
    assert quality.ppl == pytest.approx(4.0)


def test_score_measures_kl_and_disagreement_of_a_different_candidate():
    ids = torch.tensor([[0, 1]])
    reference = torch.tensor([[[2.0, 0.0], [2.0, 0.0]]])
    candidate = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])  # second position flips its argmax
    quality = peer.score(reference, candidate, ids)
    p = torch.softmax(torch.tensor([2.0, 0.0], dtype=torch.float64), 0)
    kl_flip = (p * (p.log() - p.flip(0).log())).sum().item()
    assert quality.mean_kl == pytest.approx(kl_flip / 2)
    assert quality.top1_agreement == 0.5
    # the candidate's first position predicts ids[1] = 1 with probability 1 - p[0]
    assert quality.ppl == pytest.approx(1 / (1 - p[0].item()))
    with pytest.raises(ValueError, match="logits shapes differ"):
        peer.score(reference, candidate[:, :1], ids)


def test_peer_versions_is_none_for_a_folder_without_a_python(tmp_path):
    assert peer.peer_versions(tmp_path / "no-venv") is None


def test_cpu_flags_names_the_avx512_flags_or_none():
    text = peer.cpu_flags()
    assert "avx512 flags: " in text
    listed = text.split("avx512 flags: ")[1].split()
    assert listed == ["none"] or all(flag.startswith("avx512") for flag in listed)
