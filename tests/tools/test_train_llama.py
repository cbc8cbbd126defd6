"""The dense benchmark model's trainer (:mod:`dsq.tools.train_llama`): a few steps give a loadable
``LlamaForCausalLM`` of the asked-for shape, and outputs it may not replace are left alone."""
from __future__ import annotations

import math
import re

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from dsq.assets import data_file, tiny_model_dir
from dsq.tools.train_llama import main

QUICK = ["--max-tokens", "8192", "--heldout-chars", "2000", "--mc-items", "4", "--threads", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("train_llama") / "tiny_llama"
    assert main([*QUICK, "--out", str(out)]) == 0
    return out


def test_saved_model_has_the_architecture(trained) -> None:
    model = AutoModelForCausalLM.from_pretrained(trained)
    cfg = model.config
    assert isinstance(model, LlamaForCausalLM)
    shape = (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    assert shape == (384, 6, 6, 6, 64)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings) == (1000, 2048, 1024)
    assert not cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert tuple(model.model.layers[0].mlp.down_proj.weight.shape) == (384, 1000)
    assert 11.5e6 < sum(p.numel() for p in model.parameters()) < 12.5e6
    with safe_open(trained / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118 (safe_open is not iterable)


def test_saved_model_gives_finite_logits(trained) -> None:
    model = AutoModelForCausalLM.from_pretrained(trained).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained)
    text = data_file("heldout.txt").read_text(encoding="utf-8")[:500]
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == AutoTokenizer.from_pretrained(tiny_model_dir())(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 2048)
    assert torch.isfinite(logits).all()


def test_card_reports_the_run(trained) -> None:
    card = (trained / "TRAINING.md").read_text(encoding="utf-8")
    assert "intermediate 1000" in card
    assert "8,192 tokens seen" in card
    ppl = float(re.search(r"held-out perplexity ([0-9.]+)", card).group(1))
    assert math.isfinite(ppl) and ppl > 1.0
    assert re.search(r"acc \*\*[0-9.]+\*\*", card)


def test_refuses_a_directory_it_did_not_write(tmp_path, capsys) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main([*QUICK, "--out", str(out)]) == 2
    assert "no TRAINING.md" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_refuses_the_bundled_assets(capsys) -> None:
    out = tiny_model_dir()
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    assert main([*QUICK, "--out", str(out)]) == 2
    assert "bundled assets" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before


def test_small_shape_trains_the_small_model(tmp_path) -> None:
    out = tmp_path / "llama_1m"
    assert main([*QUICK, "--shape", "1m", "--out", str(out)]) == 0
    cfg = AutoModelForCausalLM.from_pretrained(out).config
    shape = (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    assert shape == (128, 4, 4, 4, 32) and cfg.intermediate_size == 344
    card = (out / "TRAINING.md").read_text(encoding="utf-8")
    assert "1.32M-parameter" in card and "intermediate 344 (a multiple of neither 32 nor 128" in card


def test_unknown_shape_is_refused_by_name(tmp_path, capsys) -> None:
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        main([*QUICK, "--shape", "7m", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--shape" in err and "'7m'" in err
    assert not out.exists()
