"""Preflight: broken checkpoints and recipes that do not fit the model fail before any weight is read."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from dsq.cli import main
from dsq.core.checkpoint import bundled_model_path, validate_checkpoint
from dsq.core.config_checks import check_config_types, model_facts
from dsq.core.errors import CheckpointError
from dsq.core.loading import load_checkpoint
from dsq.core.tokenizer_check import check_tokenizer
from dsq.run.preflight import check_recipe_against_model
from dsq.run.recipe import load_recipe
from dsq.tools.testing import make_tiny_checkpoint, make_tiny_tokenizer

PUBLIC = Path(__file__).resolve().parents[2] / "dsq" / "assets" / "public_configs"
EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"  # (moe_intermediate 64, hidden 128) in the tiny model
ATTENTION = "model.layers.0.self_attn.o_proj.weight"
LINEAR = re.compile(r"^model\.layers\.\d+\..*proj(_with_mqa)?\.weight$")
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


# ----------------------------------------------------------------------------- editing a tiny checkpoint


def _config(root: Path, **changes) -> None:
    path = root / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _weights(root: Path, edit) -> None:
    path = root / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _copy_layer(tensors: dict, source: int, target: int) -> None:
    for name in [n for n in tensors if n.startswith(f"model.layers.{source}.")]:
        tensors[name.replace(f"layers.{source}.", f"layers.{target}.")] = tensors[name].clone()


def _to_fp8(tensors: dict) -> None:
    """Every Linear weight of the layers as FP8 e4m3 with (all-one) 128 x 128 block scales."""
    for name in [n for n in tensors if LINEAR.match(n)]:
        weight = tensors[name]
        tensors[name] = weight.to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = torch.ones(math.ceil(weight.shape[0] / 128), math.ceil(weight.shape[1] / 128))


def _fp8_checkpoint(root: Path) -> None:
    _config(root, quantization_config=FP8_CONFIG)
    _weights(root, _to_fp8)


def _fp8_with_bad_scale(root: Path) -> None:
    _fp8_checkpoint(root)
    _weights(root, lambda t: t.update({ATTENTION + "_scale_inv": torch.ones(2, 2)}))


def _tokenizer_beyond_vocab(root: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(root))
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(5)])
    tokenizer.save_pretrained(str(root))


# (edit of the tiny DeepSeek-V3 checkpoint: 2 layers, 8 experts, vocab 512) -> what the message must name
BROKEN_CHECKPOINTS = {
    "vocab_size a string": (lambda r: _config(r, vocab_size="512"), ["config.json", "'vocab_size'", '"512" (a string)']),
    "hidden_size a float": (lambda r: _config(r, hidden_size=128.0), ["config.json", "'hidden_size'", "a float"]),
    "rms_norm_eps negative": (lambda r: _config(r, rms_norm_eps=-1e-6), ["config.json", "'rms_norm_eps'"]),
    "top-k above experts": (lambda r: _config(r, num_experts_per_tok=9), ["'num_experts_per_tok' is 9", "'n_routed_experts' is 8"]),
    "num_hidden_layers 0": (lambda r: _config(r, num_hidden_layers=0), ["config.json", "'num_hidden_layers'", "got 0"]),
    "fewer layers in config": (lambda r: _config(r, num_hidden_layers=1), ["num_hidden_layers is 1", "decoder layer(s) 1", "model.safetensors"]),
    "layer beyond config": (lambda r: _weights(r, lambda t: _copy_layer(t, 1, 2)), ["num_hidden_layers is 2", "model.layers.2.*"]),
    "layer missing": (lambda r: _config(r, num_hidden_layers=3), ["num_hidden_layers is 3", "no tensor of decoder layer(s) 2"]),
    "experts beyond config": (lambda r: _config(r, n_routed_experts=4), ["n_routed_experts 4", "model.layers.1.mlp.experts.{4-7}.*"]),
    "experts missing": (lambda r: _config(r, n_routed_experts=16), ["n_routed_experts is 16", "model.layers.1.mlp.experts.{8-15}."]),
    "expert of wrong shape": (lambda r: _weights(r, lambda t: t.update({EXPERT: torch.zeros(64, 100)})),
                              [EXPERT, "(64, 100)", "implies (64, 128)"]),
    "integer weight": (lambda r: _weights(r, lambda t: t.update({EXPERT: torch.zeros(64, 128, dtype=torch.int32)})),
                       [EXPERT, "dtype I32"]),
    "tensor dropped": (lambda r: _weights(r, lambda t: t.pop(ATTENTION)), [ATTENTION, "missing 1 tensor"]),
    "fp8 weight, no fp8 config": (lambda r: _weights(r, lambda t: t.update({ATTENTION: t[ATTENTION].to(torch.float8_e4m3fn)})),
                                  [ATTENTION, "F8_E4M3", "quantization_config"]),
    "fp8 scale of wrong shape": (_fp8_with_bad_scale, [ATTENTION + "_scale_inv", "(2, 2)", "(1, 1)"]),
    "tokenizer beyond vocab": (_tokenizer_beyond_vocab, ["517 tokens", "vocab_size is 512", "tokenizer.json", "'<extra_0>' (512)"]),
}

# recipe overrides on the intact tiny checkpoint (max_position_embeddings 4096) -> what the message must name
BAD_RECIPES = {
    "perplexity context": (["eval.perplexity.context=8192"], ["eval.perplexity.context is 8192", "max_position_embeddings 4096"]),
    "speed prompt": (["eval.speed={prompt_len: 4000, new_tokens: 100}"],
                     ["eval.speed.prompt_len + eval.speed.new_tokens is 4100", "4096"]),
    "calibration seq_len": (["quantize.method=gptq", "quantize.calibration.seq_len=5000"], ["quantize.calibration.seq_len is 5000"]),
    "fidelity seq_len, streamed": (["eval.fidelity.seq_len=4097", "streaming=true"], ["eval.fidelity.seq_len is 4097"]),
    "finetune seq_len": (["quantize=null", "finetune={lora: {r: 4}, data: {seq_len: 9000}}"], ["finetune.data.seq_len is 9000"]),
    "include matches nothing": (["quantize.targets.include=['attn\\.qkv']"],
                                ["include pattern 'attn\\\\.qkv' matches no", "model.layers.N.self_attn.q_a_proj"]),
    "lm_head include without lm_head": (["quantize.targets.include=['lm_head']"], ["'lm_head' matches no"]),
    "everything excluded": (["quantize.targets.exclude=['.']"], ["selects no module"]),
}


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "progress: false\nquantize: {method: rtn}\n"
        "eval: {perplexity: null, multiple_choice: null, fidelity: {seq_len: 16, max_tokens: 32}, reload_check: false}\n"
    )
    return path


def _run(capsys, tmp_path: Path, model: Path, overrides=()) -> tuple[int, str]:
    code = main(["run", str(_recipe(tmp_path)), f"model={model}", f"output={tmp_path / 'out'}", *overrides])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(BROKEN_CHECKPOINTS))
def test_broken_checkpoint_exits_2_naming_it_and_writes_nothing(tmp_path, tiny_deepseek_v3, capsys, case):
    edit, expected = BROKEN_CHECKPOINTS[case]
    model = tmp_path / "ckpt"
    shutil.copytree(tiny_deepseek_v3, model)
    edit(model)
    code, err = _run(capsys, tmp_path, model)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_recipe_that_does_not_fit_the_model_exits_2_before_loading(tmp_path, tiny_deepseek_v3, capsys, monkeypatch, case):
    import dsq.core.loading

    def never(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(dsq.core.loading, "_load_model", never)
    monkeypatch.setattr(dsq.core.loading, "_load_tokenizer", never)
    overrides, expected = BAD_RECIPES[case]
    code, err = _run(capsys, tmp_path, tiny_deepseek_v3, overrides)
    assert code == 2, err
    for text in expected:
        assert text in err, (text, err)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- what must keep passing


def _fp8_with_mtp_layer(root: Path) -> None:
    """DeepSeek-V3's official layout: FP8 weights and a multi-token-prediction layer after the last decoder layer."""
    _config(root, quantization_config=FP8_CONFIG, num_nextn_predict_layers=1)

    def edit(tensors):
        _copy_layer(tensors, 1, 2)
        tensors["model.layers.2.eh_proj.weight"] = torch.zeros(128, 256)
        tensors["model.layers.2.enorm.weight"] = torch.ones(128)
        _to_fp8(tensors)

    _weights(root, edit)


def test_valid_checkpoints_pass(tmp_path, tiny_checkpoint):
    assert validate_checkpoint(bundled_model_path()).missing == ()
    for model_type in ("deepseek_v3", "deepseek_v2", "llama", "qwen2"):
        assert validate_checkpoint(tiny_checkpoint(model_type, 3)).notes == ()
    tied = make_tiny_checkpoint("qwen2", tmp_path / "tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(str(tied / "model.safetensors"))
    assert validate_checkpoint(tied).missing == ()
    official = tmp_path / "fp8"
    shutil.copytree(tiny_checkpoint("deepseek_v3"), official)
    _fp8_with_mtp_layer(official)
    files = validate_checkpoint(official)
    assert len(files.notes) == 1 and "multi-token-prediction" in files.notes[0] and "model.layers.2.*" in files.notes[0]


def test_tensors_the_model_does_not_use_are_a_note(tmp_path, tiny_deepseek_v3):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_deepseek_v3, root)
    unknown = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16), "model.layers.99.extra.weight": torch.ones(4)}
    _weights(root, lambda t: t.update(unknown))
    files = validate_checkpoint(root)
    assert files.missing == () and len(files.notes) == 1
    assert "2 checkpoint tensor(s) are not used" in files.notes[0] and all(name in files.notes[0] for name in unknown)


@pytest.mark.parametrize("name", sorted(p.name for p in PUBLIC.iterdir()))
def test_public_configs_pass_and_fit_the_default_recipe(name):
    path = PUBLIC / name / "config.json"
    config = json.loads(path.read_text())
    check_config_types(config, path)
    facts = model_facts(config, path)
    assert facts.num_layers == config["num_hidden_layers"]
    assert facts.max_position_embeddings == config["max_position_embeddings"]
    assert check_recipe_against_model(load_recipe(None), facts, path) == ()


def test_exclude_pattern_matching_nothing_is_a_note(tiny_deepseek_v3):
    path = tiny_deepseek_v3 / "config.json"
    facts = model_facts(json.loads(path.read_text()), path)
    recipe = load_recipe(None, ["quantize.targets.exclude=['nonexistent', 'experts$']"])
    notes = check_recipe_against_model(recipe, facts, path)
    assert len(notes) == 1 and "exclude pattern 'nonexistent' matches no" in notes[0]


def test_tokenizer_smaller_than_vocab_is_accepted_with_a_note(tmp_path, tiny_deepseek_v3):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_deepseek_v3, root)
    small = make_tiny_tokenizer(300)
    small.save_pretrained(str(root))
    assert len(small) == 300
    loaded = load_checkpoint(root)
    assert loaded.model.config.vocab_size == 512
    assert any("300 tokens, fewer than vocab_size 512" in note for note in loaded.notes), loaded.notes
    config = json.loads((root / "config.json").read_text())
    assert check_tokenizer(make_tiny_tokenizer(512), config, root) is None
    with pytest.raises(CheckpointError, match="has 512 tokens.*vocab_size is 300: 212 token id"):
        check_tokenizer(make_tiny_tokenizer(512), {**config, "vocab_size": 300}, root)
    with_unknown = make_tiny_tokenizer(512)
    with_unknown.add_special_tokens({"unk_token": "<unk>"})  # id 512: emitted only for text it cannot encode
    note = check_tokenizer(with_unknown, config, root)
    assert note is not None and "unknown token '<unk>' (id 512)" in note
