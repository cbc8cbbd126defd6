"""The bundled tiny DeepSeek-V4 (:func:`dsq.assets.tiny_v4_model_dir`, made by :mod:`dsq.tools.train_tiny_v4`):
it loads through dsq's loader with every V4 part, shares the tokenizer of the tiny DeepSeek-V3, is
trained (held-out perplexity far below an untrained model's), and its hash table is balanced."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, DeepseekV4ForCausalLM
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4CSACompressor,
    DeepseekV4GroupedLinear,
    DeepseekV4HashRouter,
    DeepseekV4HCACompressor,
    DeepseekV4Indexer,
    DeepseekV4TopKRouter,
)

from dsq.assets import data_file, tiny_model_dir, tiny_v4_model_dir
from dsq.core.loading import load_checkpoint
from dsq.tools.tiny_model import PPL_CONTEXT, encode, heldout_perplexity
from dsq.tools.train_tiny_v4 import balanced_hash_table, hash_loads

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
HELDOUT_CHARS = 20_000  # a prefix of data/heldout.txt (~6k tokens) keeps the perplexity tests fast
MAX_PPL = 25.0  # on that prefix (and on the whole file, in the card): the trained model scores 15.3, an untrained one ~2150


@pytest.fixture(scope="module")
def loaded():
    return load_checkpoint(tiny_v4_model_dir())


@pytest.fixture(scope="module")
def heldout() -> str:
    return data_file("heldout.txt").read_text(encoding="utf-8")[:HELDOUT_CHARS]


def test_has_the_size_of_the_v3_tiny(loaded) -> None:
    cfg = loaded.model.config
    assert isinstance(loaded.model, DeepseekV4ForCausalLM)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (256, 4, 2048)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok) == (8, 2)
    files = [p for p in tiny_v4_model_dir().iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20_000_000


def test_has_every_v4_attention_part(loaded) -> None:
    cfg = loaded.model.config
    assert set(cfg.layer_types) == {SLIDING, CSA, HCA}
    assert cfg.hc_mult >= 2 and cfg.o_groups >= 2
    for layer, kind in zip(loaded.model.model.layers, cfg.layer_types):
        attn = layer.self_attn
        assert isinstance(attn.o_a_proj, DeepseekV4GroupedLinear) and attn.o_a_proj.n_groups == cfg.o_groups
        assert layer.attn_hc.fn.shape[1] == cfg.hc_mult * cfg.hidden_size
        if kind == SLIDING:
            assert attn.compressor is None
        elif kind == CSA:
            assert isinstance(attn.compressor, DeepseekV4CSACompressor)
            assert isinstance(attn.compressor.indexer, DeepseekV4Indexer)
        else:
            assert isinstance(attn.compressor, DeepseekV4HCACompressor)


def test_compressed_attention_is_used_in_evaluation_windows(loaded) -> None:
    """In a PPL_CONTEXT-token window, tokens fall out of the sliding window, the CSA indexer keeps
    fewer entries than there are, and HCA closes several windows."""
    cfg = loaded.model.config
    assert cfg.sliding_window < PPL_CONTEXT // 2
    assert cfg.index_topk < PPL_CONTEXT // cfg.compress_rates[CSA]
    assert PPL_CONTEXT // cfg.compress_rates[HCA] >= 4


def test_has_hash_and_topk_moe_layers_with_a_balanced_frozen_table(loaded) -> None:
    cfg = loaded.model.config
    assert set(cfg.mlp_layer_types) == {"hash_moe", "moe"}
    routers = [layer.mlp.gate for layer in loaded.model.model.layers]
    for router, kind in zip(routers, cfg.mlp_layer_types):
        assert isinstance(router, DeepseekV4HashRouter if kind == "hash_moe" else DeepseekV4TopKRouter)
    table = next(r.tid2eid for r in routers if isinstance(r, DeepseekV4HashRouter))
    assert table.shape == (cfg.vocab_size, cfg.num_experts_per_tok)
    assert "tid2eid" not in dict(loaded.model.named_parameters())  # a buffer: never trained
    assert int(table.min()) >= 0 and int(table.max()) < cfg.n_routed_experts
    assert (table[:, 0] != table[:, 1]).all()  # two distinct experts per token (the init is all zeros)
    ids = torch.tensor(encode(loaded.tokenizer, data_file("calibration.txt").read_text(encoding="utf-8")))
    loads = hash_loads(table, ids, cfg.n_routed_experts)
    assert max(loads) < 1.15 / cfg.n_routed_experts and min(loads) > 0.85 / cfg.n_routed_experts, loads


def test_stores_bf16_weights_and_fp32_only_where_transformers_keeps_fp32() -> None:
    with safe_open(tiny_v4_model_dir() / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert set(dtypes.values()) == {"BF16", "F32", "I64"}
    fp32_kinds = re.compile(r"(hc_|norm|attn_sink|\.ape$|gate\.bias$)")
    assert all(fp32_kinds.search(k) for k, v in dtypes.items() if v == "F32")
    assert all(k.endswith("tid2eid") for k, v in dtypes.items() if v == "I64")
    assert any(".experts.0.w1." in k for k in dtypes)  # per-expert tensors under V4's own names


def test_shares_the_v3_tiny_tokenizer(loaded, heldout) -> None:
    v3 = AutoTokenizer.from_pretrained(str(tiny_model_dir()))
    assert loaded.tokenizer.get_vocab() == v3.get_vocab()
    assert encode(loaded.tokenizer, heldout) == encode(v3, heldout)


def test_heldout_perplexity_is_far_below_an_untrained_model(loaded, heldout) -> None:
    trained = heldout_perplexity(loaded.model, loaded.tokenizer, heldout)["ppl"]
    assert trained < MAX_PPL
    torch.manual_seed(0)
    untrained = DeepseekV4ForCausalLM(loaded.model.config).eval()
    assert heldout_perplexity(untrained, loaded.tokenizer, heldout)["ppl"] > 20 * MAX_PPL


def test_card_reports_the_stored_model(loaded) -> None:
    card = (tiny_v4_model_dir() / "TRAINING.md").read_text(encoding="utf-8")
    for part in (SLIDING, CSA, HCA, "hash_moe", "hyper-connection", "grouped output projection", "indexer"):
        assert part in card
    card_ppl = float(re.search(r"held-out perplexity ([0-9.]+)\*\*", card).group(1))
    untrained_ppl = float(re.search(r"untrained model with the same init: held-out perplexity ([0-9.]+)", card).group(1))
    assert card_ppl < MAX_PPL < 20 * MAX_PPL < untrained_ppl


def test_hash_table_balances_a_skewed_token_distribution() -> None:
    counts = (1e5 / torch.arange(1, 2049).double() ** 1.1).long()  # Zipf-like training counts
    table = balanced_hash_table(counts, num_experts=8, top_k=2, seed=7)
    assert table.shape == (2048, 2) and (table[:, 0] != table[:, 1]).all()
    load = torch.zeros(8, dtype=torch.float64).index_add_(0, table.reshape(-1), (counts + 1).double().repeat_interleave(2))
    assert float(load.max() / load.min()) < 1.05
    assert torch.equal(table, balanced_hash_table(counts, num_experts=8, top_k=2, seed=7))
    assert not torch.equal(table, balanced_hash_table(counts, num_experts=8, top_k=2, seed=8))
    with pytest.raises(ValueError, match="top_k"):
        balanced_hash_table(counts, num_experts=2, top_k=3)
