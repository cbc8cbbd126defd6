"""Each weight file's safetensors header is read once per run, by inspection; every reader takes it from there."""
from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsq.core.safetensors_header
from dsq.core.checkpoint import (
    bundled_model_path,
    inspect_checkpoint,
    source_info,
    validate_checkpoint,
)
from dsq.core.errors import CheckpointError
from dsq.core.layered import load_model_by_layers
from dsq.core.loading import load_checkpoint
from dsq.core.shards import ShardedTensors
from dsq.run.recipe import load_recipe
from dsq.run.streaming import checkpoint_values, decide_streaming

ATTENTION = "model.layers.0.self_attn.o_proj.weight"


@pytest.fixture
def header_reads(monkeypatch) -> Counter:
    """Every safetensors header dsq reads from disk, counted by resolved file path."""
    reads: Counter = Counter()
    raw_reader = dsq.core.safetensors_header._read_raw_header

    def counting(path: Path, size: int):
        reads[Path(path).resolve()] += 1
        return raw_reader(path, size)

    monkeypatch.setattr(dsq.core.safetensors_header, "_read_raw_header", counting)
    return reads


def _copy(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    return target


def test_validate_decide_load_and_stream_read_each_header_once(tiny_checkpoint, header_reads):
    src = tiny_checkpoint("deepseek_v3", 3)
    files = validate_checkpoint(src)
    assert checkpoint_values(files) > 0
    decide_streaming(None, files, torch.float32)
    loaded = load_checkpoint(files)
    assert loaded.source == source_info(files)
    layered = load_model_by_layers(files, dtype=torch.float32)  # ShardedTensors: the shard reader
    assert torch.equal(layered.state_dict()[ATTENTION], loaded.model.state_dict()[ATTENTION])
    weights = [path.resolve() for path in files.weight_files]
    assert len(weights) == 3 and {path: header_reads[path] for path in weights} == dict.fromkeys(weights, 1)


def test_loading_validated_files_equals_loading_the_path(tiny_deepseek_v3):
    files = validate_checkpoint(tiny_deepseek_v3)
    by_files, by_path = load_checkpoint(files), load_checkpoint(tiny_deepseek_v3)
    assert by_files.source == by_path.source and by_files.notes == by_path.notes
    assert torch.equal(by_files.model.state_dict()[ATTENTION], by_path.model.state_dict()[ATTENTION])


def test_loading_inspected_files_refuses_what_validation_refuses(tmp_path, tiny_deepseek_v3):
    root = _copy(tiny_deepseek_v3, tmp_path)
    tensors = load_file(str(root / "model.safetensors"))
    del tensors[ATTENTION]
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    files = inspect_checkpoint(root)  # records the missing tensor, raises nothing
    assert files.missing == (ATTENTION,)
    with pytest.raises(CheckpointError) as by_path:
        load_checkpoint(root)
    with pytest.raises(CheckpointError) as by_files:
        load_checkpoint(files)
    assert str(by_files.value) == str(by_path.value) and ATTENTION in str(by_files.value)


def test_loading_inspected_custom_model_type_needs_trust_remote_code(tmp_path, tiny_deepseek_v3):
    root = _copy(tiny_deepseek_v3, tmp_path)
    config = (root / "config.json").read_text().replace('"deepseek_v3"', '"my_moe"')
    (root / "config.json").write_text(config)
    files = inspect_checkpoint(root, allow_unsupported=True)
    with pytest.raises(CheckpointError, match="unsupported model_type 'my_moe'"):
        load_checkpoint(files)


def test_carried_headers_describe_every_tensor(tiny_checkpoint):
    files = inspect_checkpoint(tiny_checkpoint("deepseek_v3", 3))
    assert tuple(header.path for header in files.headers) == files.weight_files
    assert set(files.tensors) == set(files.tensor_names) == set(files.index["weight_map"])
    for name, tensor in files.tensors.items():
        assert tensor.file.name == files.index["weight_map"][name]
        stored = load_file(str(tensor.file))[name]
        assert tensor.shape == tuple(stored.shape)
        start, end = tensor.data_offsets
        assert end - start == stored.numel() * stored.element_size()


def test_source_info_refuses_a_weight_file_changed_since_inspection(tmp_path, tiny_deepseek_v3):
    root = _copy(tiny_deepseek_v3, tmp_path)
    files = inspect_checkpoint(root)
    with (root / "model.safetensors").open("ab") as handle:
        handle.write(b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"model\.safetensors changed since the checkpoint was inspected"):
        source_info(files)


def test_shard_reader_refuses_a_shape_from_the_header(tiny_deepseek_v3):
    files = validate_checkpoint(tiny_deepseek_v3)
    source = ShardedTensors(files)
    stored = files.tensors[ATTENTION].shape
    with source.reader() as read, pytest.raises(CheckpointError, match=re.escape(f"has shape {stored}, the model needs (3, 3)")):
        read(ATTENTION, torch.empty(3, 3))
    assert source.unused() == sorted(files.tensors)  # nothing was read


def test_a_run_reads_each_header_of_the_model_once(tmp_path, header_reads):
    from dsq.run.pipeline import run

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"output: {tmp_path / 'out'}\nprogress: false\nquantize: {{method: rtn}}\n"
        "eval: {perplexity: null, multiple_choice: null, fidelity: {seq_len: 16, max_tokens: 32}, reload_check: false}\n"
    )
    run(load_recipe(recipe))
    weights = [path.resolve() for path in inspect_checkpoint(bundled_model_path()).weight_files]
    counted = {path: header_reads[path] - 1 for path in weights}  # the inspection just above
    assert counted == dict.fromkeys(weights, 1)
