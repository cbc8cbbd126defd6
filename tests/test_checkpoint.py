"""Tests of checkpoint validation and loading."""
from __future__ import annotations

import json
import logging
import pickle
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from dsq.core.checkpoint import (
    CheckpointFiles,
    bundled_model_path,
    inspect_checkpoint,
    read_safetensors_header,
    source_info,
)
from dsq.core.errors import CheckpointError, DsqInputError
from dsq.core.layout import SUPPORTED_MODEL_TYPES
from dsq.core.loading import load_checkpoint
from dsq.tools.testing import make_tiny_checkpoint, make_tiny_tokenizer, tiny_config

ATTENTION_KEY = "model.layers.0.self_attn.q_b_proj.weight"
EXPERT_KEY = "model.layers.1.mlp.experts.3.up_proj.weight"
TEXT = "The quick brown fox, 42 experts, naïve café ✓"


def _copy(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    return target


def _rewrite_weights(root: Path, edit: Any) -> None:
    weights = root / "model.safetensors"
    tensors = load_file(str(weights))
    edit(tensors)
    save_file(tensors, str(weights), metadata={"format": "pt"})


def _error(exc_info: pytest.ExceptionInfo[CheckpointError]) -> str:
    return str(exc_info.value)


# --------------------------------------------------------------------------- loading


LOAD_CASES = [(model_type, 1) for model_type in SUPPORTED_MODEL_TYPES] + [("deepseek_v3", 3)]


@pytest.mark.parametrize(("model_type", "shards"), LOAD_CASES)
def test_loads_every_architecture(tiny_checkpoint: Any, model_type: str, shards: int) -> None:
    root = tiny_checkpoint(model_type, shards)
    loaded = load_checkpoint(root)
    assert not loaded.model.training
    assert loaded.model.config.model_type == model_type
    ids = loaded.tokenizer(TEXT, return_tensors="pt").input_ids
    assert loaded.tokenizer.decode(ids[0], skip_special_tokens=True) == TEXT
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], 512)
    assert torch.isfinite(logits).all()
    assert loaded.source.model_type == model_type
    assert len(loaded.source.weight_files) == shards
    assert loaded.source.path == str(root.resolve())


def test_sharded_checkpoint_matches_single_file(tiny_checkpoint: Any) -> None:
    single = inspect_checkpoint(tiny_checkpoint("deepseek_v3"))
    sharded = inspect_checkpoint(tiny_checkpoint("deepseek_v3", 3))
    assert sharded.index is not None and single.index is None
    assert sharded.tensor_names == single.tensor_names
    assert source_info(sharded).num_parameters == source_info(single).num_parameters


def test_dtype_is_applied(tiny_deepseek_v3: Path) -> None:
    assert load_checkpoint(tiny_deepseek_v3, dtype=torch.bfloat16).model.dtype == torch.bfloat16


def test_fused_experts_are_saved_per_expert(tiny_deepseek_v3: Path) -> None:
    names = inspect_checkpoint(tiny_deepseek_v3).tensor_names
    assert EXPERT_KEY in names
    assert not any(name.endswith("experts.gate_up_proj") for name in names)


# --------------------------------------------------------------------------- directory and config


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(missing)
    assert str(missing) in _error(exc_info) and "does not exist" in _error(exc_info)


def test_file_instead_of_directory(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(file)
    assert str(file) in _error(exc_info) and "is a file" in _error(exc_info)


def test_no_config(tiny_deepseek_v3: Path, tmp_path: Path) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)
    (root / "config.json").unlink()
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(root)
    assert str(root) in _error(exc_info) and "config.json" in _error(exc_info)


def test_invalid_json_config(tiny_deepseek_v3: Path, tmp_path: Path) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)
    (root / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(root)
    assert str(root / "config.json") in _error(exc_info) and "not valid JSON" in _error(exc_info)


def test_config_without_model_type(tiny_deepseek_v3: Path, tmp_path: Path) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)
    (root / "config.json").write_text(json.dumps({"hidden_size": 128}), encoding="utf-8")
    with pytest.raises(CheckpointError) as exc_info:
        inspect_checkpoint(root)
    assert str(root / "config.json") in _error(exc_info) and "model_type" in _error(exc_info)


def _set_model_type(root: Path, model_type: str, **extra: Any) -> None:
    config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    config.update(model_type=model_type, **extra)
    (root / "config.json").write_text(json.dumps(config), encoding="utf-8")


def test_unsupported_model_type(tiny_deepseek_v3: Path, tmp_path: Path) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)
    _set_model_type(root, "gpt2")
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(root)
    message = _error(exc_info)
    assert "'gpt2'" in message and str(root) in message
    assert all(model_type in message for model_type in SUPPORTED_MODEL_TYPES)
    assert isinstance(inspect_checkpoint(root, allow_unsupported=True), CheckpointFiles)


def test_unsupported_model_type_needs_auto_map_even_with_remote_code(
    tiny_deepseek_v3: Path, tmp_path: Path
) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)
    _set_model_type(root, "my_model")
    with pytest.raises(CheckpointError, match="unsupported model_type 'my_model'"):
        load_checkpoint(root, trust_remote_code=True)
    _set_model_type(root, "my_model", auto_map={"AutoModelForCausalLM": "modeling_my.MyModel"})
    with pytest.raises(CheckpointError, match="trust_remote_code"):
        load_checkpoint(root)


# --------------------------------------------------------------------------- weight files


def test_pickle_only_weights_are_never_unpickled(
    tiny_deepseek_v3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)
    (root / "model.safetensors").unlink()
    payload = b"\x00\xffnot a pickle at all"
    (root / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(payload)

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pickle-based weights must never be deserialised")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(root)
    message = _error(exc_info)
    assert "pytorch_model.bin" in message and str(root) in message
    assert "arbitrary code" in message and "safetensors" in message


def test_no_weights(tiny_deepseek_v3: Path, tmp_path: Path) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)
    (root / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        inspect_checkpoint(root)


def test_truncated_safetensors(tiny_deepseek_v3: Path, tmp_path: Path) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)
    weights = root / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(root)
    message = _error(exc_info)
    assert str(weights) in message and "truncated" in message
    assert f"implies {len(data)} bytes" in message and f"has {len(data) - 100} bytes" in message


def test_garbage_safetensors(tiny_deepseek_v3: Path, tmp_path: Path) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)
    weights = root / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(root)
    assert str(weights) in _error(exc_info) and "header length" in _error(exc_info)


def test_corrupt_header_json(tiny_deepseek_v3: Path, tmp_path: Path) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)
    weights = root / "model.safetensors"
    garbage = b"\x93\x01{garbage]]"
    weights.write_bytes(struct.pack("<Q", len(garbage)) + garbage + b"\x00" * 32)
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(root)
    assert str(weights) in _error(exc_info) and "not valid JSON" in _error(exc_info)


def _write_header(path: Path, header: dict[str, Any], data_size: int) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * data_size)


def test_header_span_must_match_dtype_and_shape(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    _write_header(path, {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}, 32)
    with pytest.raises(CheckpointError) as exc_info:
        read_safetensors_header(path)
    assert str(path) in _error(exc_info) and "'w'" in _error(exc_info) and "64 bytes" in _error(exc_info)


def test_header_offsets_beyond_file(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    _write_header(path, {"w": {"dtype": "F16", "shape": [8], "data_offsets": [0, 16]}}, 4)
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_header(path)


def test_header_unknown_dtype(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    _write_header(path, {"w": {"dtype": "F3", "shape": [8], "data_offsets": [0, 3]}}, 3)
    with pytest.raises(CheckpointError, match="tensor 'w' has unknown dtype 'F3'"):
        read_safetensors_header(path)


def test_valid_header(tiny_deepseek_v3: Path) -> None:
    header, header_len = read_safetensors_header(tiny_deepseek_v3 / "model.safetensors")
    assert header[EXPERT_KEY]["dtype"] == "F32" and header[EXPERT_KEY]["shape"] == [64, 128]
    assert header_len % 8 == 0


# --------------------------------------------------------------------------- shard index


def test_index_names_missing_shard(tiny_checkpoint: Any, tmp_path: Path) -> None:
    root = _copy(tiny_checkpoint("deepseek_v3", 3), tmp_path)
    (root / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(root)
    assert "model-00002-of-00003.safetensors" in _error(exc_info) and "does not exist" in _error(exc_info)


def test_index_maps_tensor_to_wrong_shard(tiny_checkpoint: Any, tmp_path: Path) -> None:
    root = _copy(tiny_checkpoint("deepseek_v3", 3), tmp_path)
    index_path = root / "model.safetensors.index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    first = "model-00001-of-00003.safetensors"
    key = next(name for name, shard in index["weight_map"].items() if shard != first)
    index["weight_map"][key] = first
    index_path.write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(CheckpointError) as exc_info:
        inspect_checkpoint(root)
    assert key in _error(exc_info) and "model-00001-of-00003.safetensors" in _error(exc_info)


def test_invalid_index(tiny_checkpoint: Any, tmp_path: Path) -> None:
    root = _copy(tiny_checkpoint("deepseek_v3", 3), tmp_path)
    (root / "model.safetensors.index.json").write_text("[", encoding="utf-8")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json is not valid JSON"):
        inspect_checkpoint(root)


def test_index_shard_outside_directory(tiny_checkpoint: Any, tmp_path: Path) -> None:
    root = _copy(tiny_checkpoint("deepseek_v3", 3), tmp_path)
    index_path = root / "model.safetensors.index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"'\.\./elsewhere\.safetensors'.*lm_head\.weight"):
        inspect_checkpoint(root)


# --------------------------------------------------------------------------- tensors


def test_missing_attention_tensor(tiny_deepseek_v3: Path, tmp_path: Path) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)
    _rewrite_weights(root, lambda tensors: tensors.pop(ATTENTION_KEY))
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(root)
    assert ATTENTION_KEY in _error(exc_info) and "missing" in _error(exc_info)


def test_missing_expert_tensor(tiny_deepseek_v3: Path, tmp_path: Path) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)
    _rewrite_weights(root, lambda tensors: tensors.pop(EXPERT_KEY))
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(root)
    assert EXPERT_KEY in _error(exc_info) and "missing 1 expert tensor" in _error(exc_info)


def test_missing_last_expert(tiny_deepseek_v3: Path, tmp_path: Path) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)

    def drop_expert_7(tensors: dict[str, torch.Tensor]) -> None:
        for name in [name for name in tensors if ".experts.7." in name]:
            del tensors[name]

    _rewrite_weights(root, drop_expert_7)
    with pytest.raises(CheckpointError) as exc_info:
        inspect_checkpoint(root)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in _error(exc_info)


def test_missing_all_experts_of_a_layer(tiny_deepseek_v3: Path, tmp_path: Path) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)

    def drop_experts(tensors: dict[str, torch.Tensor]) -> None:
        for name in [name for name in tensors if ".mlp.experts." in name]:
            del tensors[name]

    _rewrite_weights(root, drop_experts)
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(root)
    message = _error(exc_info)
    assert "missing 24 tensor(s)" in message  # 8 experts x gate/up/down, folded into one entry
    assert "model.layers.1.mlp.experts.{0-7}.{down_proj.weight,gate_proj.weight,up_proj.weight}" in message


def test_mismatched_tensor_shape(tiny_deepseek_v3: Path, tmp_path: Path) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)
    _rewrite_weights(root, lambda tensors: tensors.update({ATTENTION_KEY: torch.zeros(100, 64)}))
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(root)
    assert ATTENTION_KEY in _error(exc_info) and "(100, 64)" in _error(exc_info)


def test_unexpected_tensor_is_a_warning(
    tiny_deepseek_v3: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)
    _rewrite_weights(root, lambda tensors: tensors.update({"extra.weight": torch.zeros(3)}))
    with caplog.at_level(logging.WARNING, logger="dsq.core.loading"):
        load_checkpoint(root)
    messages = [record.getMessage() for record in caplog.records if record.name == "dsq.core.loading"]
    assert any("extra.weight" in message and str(root) in message for message in messages)


def test_missing_tokenizer(tiny_deepseek_v3: Path, tmp_path: Path) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / name).unlink()
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(root)
    assert str(root) in _error(exc_info) and "tokenizer" in _error(exc_info)


def test_corrupt_tokenizer(tiny_deepseek_v3: Path, tmp_path: Path) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)
    (root / "tokenizer.json").write_text("garbage", encoding="utf-8")
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(root)
    assert str(root) in _error(exc_info) and "tokenizer" in _error(exc_info)


def test_checkpoint_error_is_input_error() -> None:
    assert issubclass(CheckpointError, DsqInputError)


# --------------------------------------------------------------------------- remote code


class _Captured(Exception):
    pass


def _capture_kwargs(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], dict[str, Any]]:
    """Record the keyword arguments of the model and tokenizer loaders; stop at the model."""
    model_kwargs: dict[str, Any] = {}
    tokenizer_kwargs: dict[str, Any] = {}
    load_tokenizer = transformers.AutoTokenizer.from_pretrained

    def fake_model(*args: Any, **kwargs: Any) -> None:
        model_kwargs.update(kwargs)
        raise _Captured

    def spy_tokenizer(*args: Any, **kwargs: Any) -> Any:
        tokenizer_kwargs.update(kwargs)
        return load_tokenizer(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy_tokenizer)
    return model_kwargs, tokenizer_kwargs


def test_remote_code_is_off_by_default(tiny_deepseek_v3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_kwargs, tokenizer_kwargs = _capture_kwargs(monkeypatch)
    with pytest.raises(_Captured):
        load_checkpoint(tiny_deepseek_v3)
    for kwargs in (model_kwargs, tokenizer_kwargs):
        assert kwargs.get("trust_remote_code", False) is False
        assert kwargs["local_files_only"] is True
    assert model_kwargs["use_safetensors"] is True


def test_remote_code_when_requested(tiny_deepseek_v3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_kwargs, tokenizer_kwargs = _capture_kwargs(monkeypatch)
    with pytest.raises(_Captured):
        load_checkpoint(tiny_deepseek_v3, trust_remote_code=True)
    assert model_kwargs["trust_remote_code"] is True and tokenizer_kwargs["trust_remote_code"] is True


# --------------------------------------------------------------------------- identity


def test_fingerprint_is_stable_and_tracks_weight_bytes(tiny_deepseek_v3: Path, tmp_path: Path) -> None:
    root = _copy(tiny_deepseek_v3, tmp_path)
    first = source_info(inspect_checkpoint(root))
    assert source_info(inspect_checkpoint(root)) == first
    weights = root / "model.safetensors"
    header_len = struct.unpack("<Q", weights.read_bytes()[:8])[0]
    data = bytearray(weights.read_bytes())
    position = 8 + header_len + 5
    data[position] ^= 0xFF
    weights.write_bytes(bytes(data))
    changed = source_info(inspect_checkpoint(root))
    assert changed.fingerprint != first.fingerprint
    assert changed.num_parameters == first.num_parameters


def test_source_info_fields(tiny_deepseek_v3: Path) -> None:
    info = source_info(inspect_checkpoint(tiny_deepseek_v3))
    assert info.architectures == ("DeepseekV3ForCausalLM",)
    assert info.weight_files == ("model.safetensors",)
    assert info.weight_bytes == (tiny_deepseek_v3 / "model.safetensors").stat().st_size
    tensors = load_file(str(tiny_deepseek_v3 / "model.safetensors"))
    assert info.num_parameters == sum(tensor.numel() for tensor in tensors.values())
    assert json.loads(json.dumps(info.to_dict()))["weight_files"] == ["model.safetensors"]


def test_tiny_checkpoints_are_deterministic(tiny_deepseek_v3: Path, tmp_path: Path) -> None:
    again = make_tiny_checkpoint("deepseek_v3", tmp_path / "again")
    other_seed = make_tiny_checkpoint("deepseek_v3", tmp_path / "other", seed=1)
    reference = source_info(inspect_checkpoint(tiny_deepseek_v3)).fingerprint
    assert source_info(inspect_checkpoint(again)).fingerprint == reference
    assert source_info(inspect_checkpoint(other_seed)).fingerprint != reference


def test_tiny_helpers() -> None:
    assert tiny_config("deepseek_v2").q_lora_rank is None
    assert len(make_tiny_tokenizer()) <= 512
    with pytest.raises(ValueError, match="gpt2"):
        tiny_config("gpt2")
    assert bundled_model_path().parts[-2:] == ("assets", "tiny_deepseek_v3")
