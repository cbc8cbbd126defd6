"""Calibration data: sources, token windows, determinism and error messages."""
from __future__ import annotations

import copy
import json
import socket
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dsq.assets import data_file, tiny_model_dir
from dsq.core.errors import DataError
from dsq.quantize.calibration_data import (
    SUPPORTED_SUFFIXES,
    CalibrationDataSpec,
    CalibrationSummary,
    load_calibration,
    load_calibration_with_summary,
)
from dsq.tools.testing import byte_bpe_tokenizer

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """One token per byte (no merges): token counts equal ASCII character counts; eos id 1."""
    return byte_bpe_tokenizer(["calibration"], 259)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _stream(texts: list[str], tok: PreTrainedTokenizerFast) -> torch.Tensor:
    """The expected token stream: documents without special tokens, joined with eos."""
    ids: list[int] = []
    for number, text in enumerate(texts):
        if number:
            ids.append(tok.eos_token_id)
        ids.extend(tok(text, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def _words(tag: str, count: int) -> str:
    """Text without repeated 8+ character runs, so every window has one place in the stream."""
    return " ".join(f"{tag}{i}" for i in range(count)) + " "


def _window_starts(ids: torch.Tensor, stream: torch.Tensor) -> list[int]:
    """Where each row of ``ids`` sits in ``stream``; fails if a row is not a slice of it."""
    seq_len = ids.shape[1]
    starts = []
    for row in ids:
        matches = [
            s for s in range(stream.numel() - seq_len + 1) if torch.equal(stream[s : s + seq_len], row)
        ]
        assert len(matches) == 1, f"row {row.tolist()} is not a unique window of the stream"
        starts.append(matches[0])
    return starts


def _assert_non_overlapping_grid(starts: list[int], seq_len: int) -> None:
    assert len(set(starts)) == len(starts)
    assert len({s % seq_len for s in starts}) == 1  # one grid: same offset for all windows


# --- sources ------------------------------------------------------------------------------


def test_txt_file_is_one_document_and_windows_are_slices_of_it(tmp_path: Path, tok) -> None:
    text = "first paragraph\nline two\n\nsecond paragraph after a blank line\n" + _words("w", 60)
    path = tmp_path / "calib.txt"
    path.write_text(text)
    spec = CalibrationDataSpec(path=str(path), samples=5, seq_len=16)
    ids, summary = load_calibration_with_summary(spec, tok)
    assert ids.shape == (5, 16) and ids.dtype == torch.int64
    assert summary.documents == 1 and summary.tokens == len(text)
    assert summary.windows_available == len(text) // 16
    assert summary.source == str(path.resolve()) and summary.source_kind == "file" and summary.field == "text"
    _assert_non_overlapping_grid(_window_starts(ids, _stream([text], tok)), 16)
    assert tok.eos_token_id not in ids  # one document: no separators


def test_txt_ignores_text_field(tmp_path: Path, tok) -> None:
    path = tmp_path / "calib.txt"
    path.write_text("abcdefgh" * 8)
    ids = load_calibration(CalibrationDataSpec(path=str(path), text_field="body", samples=2, seq_len=8), tok)
    assert tok.decode(ids[0]) == "abcdefgh"  # the 8-aligned windows of a period-8 text


def test_jsonl_text_field_joins_documents_with_eos(tmp_path: Path, tok) -> None:
    docs = [_words("alpha", 10), _words("beta", 12), _words("gamma", 9)]
    rows = [{"body": d, "n": i} for i, d in enumerate(docs)] + [{"n": 99}, {"body": ""}]  # skipped rows
    path = _write_jsonl(tmp_path / "calib.jsonl", rows)
    spec = CalibrationDataSpec(path=str(path), text_field="body", samples=8, seq_len=20)
    ids, summary = load_calibration_with_summary(spec, tok)
    stream = _stream(docs, tok)
    assert summary.documents == 3 and summary.tokens == stream.numel() == sum(map(len, docs)) + 2
    assert ids.shape == (8, 20)
    _assert_non_overlapping_grid(_window_starts(ids, stream), 20)


def test_json_array_file(tmp_path: Path, tok) -> None:
    path = tmp_path / "calib.json"
    path.write_text(json.dumps([{"text": "x" * 30}, {"text": "y" * 30}]))
    spec = CalibrationDataSpec(path=str(path), samples=3, seq_len=20)
    ids, summary = load_calibration_with_summary(spec, tok)
    assert summary.documents == 2 and summary.tokens == 61
    assert set(tok.decode(ids.flatten(), skip_special_tokens=True)) <= {"x", "y"}


def test_parquet_file(tmp_path: Path, tok) -> None:
    docs = [_words("one", 8), _words("two", 8)]
    path = tmp_path / "calib.parquet"
    datasets.Dataset.from_dict({"content": docs, "id": [0, 1]}).to_parquet(str(path))
    spec = CalibrationDataSpec(path=str(path), text_field="content", samples=4, seq_len=12)
    ids, summary = load_calibration_with_summary(spec, tok)
    assert summary.documents == 2 and summary.tokens == _stream(docs, tok).numel()
    _assert_non_overlapping_grid(_window_starts(ids, _stream(docs, tok)), 12)


def test_save_to_disk_dataset_directory(tmp_path: Path, tok) -> None:
    docs = [_words(f"doc{i}x", 12) for i in range(4)]
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    ids, summary = load_calibration_with_summary(
        CalibrationDataSpec(path=str(tmp_path / "ds"), split="ignored", samples=6, seq_len=32), tok
    )
    assert summary.source_kind == "directory" and summary.documents == 4
    _assert_non_overlapping_grid(_window_starts(ids, _stream(docs, tok)), 32)


def test_save_to_disk_dataset_dict_uses_the_split(tmp_path: Path, tok) -> None:
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["t" * 100]}),
            "validation": datasets.Dataset.from_dict({"text": ["v" * 50, "w" * 50]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    spec = CalibrationDataSpec(path=str(tmp_path / "dd"), split="validation", samples=4, seq_len=10)
    ids, summary = load_calibration_with_summary(spec, tok)
    assert summary.documents == 2 and summary.tokens == 101
    assert set(tok.decode(ids.flatten(), skip_special_tokens=True)) <= {"v", "w"}
    with pytest.raises(DataError, match=r"dd.*no split 'test'.*\['train', 'validation'\]"):
        load_calibration(CalibrationDataSpec(path=str(tmp_path / "dd"), split="test"), tok)


def test_messages_rendered_with_chat_template(tmp_path: Path, tok) -> None:
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = CHAT_TEMPLATE
    chats = [
        [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"}],
        [{"role": "user", "content": "name a prime number"}, {"role": "assistant", "content": "seven"}],
    ]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": m, "text": "unused"} for m in chats])
    spec = CalibrationDataSpec(path=str(path), messages_field="messages", samples=3, seq_len=16)
    ids, summary = load_calibration_with_summary(spec, chat_tok)
    rendered = [chat_tok.apply_chat_template(m, tokenize=False) for m in chats]
    assert rendered[0] == "<|user|>what is two plus two\n<|assistant|>four\n"
    assert summary.chat_template and summary.field == "messages" and summary.documents == 2
    assert summary.tokens == _stream(rendered, chat_tok).numel()
    _assert_non_overlapping_grid(_window_starts(ids, _stream(rendered, chat_tok)), 16)


def test_bundled_default_with_the_tiny_model_tokenizer() -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir()))
    ids, summary = load_calibration_with_summary(CalibrationDataSpec(samples=8, seq_len=256), tokenizer)
    assert ids.shape == (8, 256) and ids.dtype == torch.int64
    assert 0 <= int(ids.min()) and int(ids.max()) < len(tokenizer)
    assert summary.source_kind == "bundled" and summary.source == str(data_file("calibration.txt"))
    assert summary.documents == 1 and summary.windows_available == summary.tokens // 256 >= 8
    assert json.loads(json.dumps(summary.to_dict())) == summary.to_dict()


def test_path_takes_precedence_over_dataset(tmp_path: Path, tok, monkeypatch) -> None:
    def no_hub(*args, **kwargs):
        raise AssertionError("the hub must not be tried when path is set")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    datasets.Dataset.from_dict({"text": ["local " * 10]}).save_to_disk(str(tmp_path / "ds"))
    spec = CalibrationDataSpec(path=str(tmp_path / "ds"), dataset="org/remote", samples=2, seq_len=8)
    assert load_calibration(spec, tok).shape == (2, 8)


def test_local_files_touch_neither_network_nor_the_user_cache(tmp_path: Path, tok, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    before = sorted(cache.rglob("*")) if cache.exists() else None
    path = _write_jsonl(tmp_path / "calib.jsonl", [{"text": "offline " * 20}])
    assert load_calibration(CalibrationDataSpec(path=str(path), samples=4, seq_len=16), tok).shape == (4, 16)
    assert (sorted(cache.rglob("*")) if cache.exists() else None) == before


# --- determinism --------------------------------------------------------------------------


def test_same_seed_same_tensor_different_seed_different(tmp_path: Path, tok) -> None:
    path = tmp_path / "calib.txt"
    path.write_text("".join(f"line {i}: the value is {i * i}\n" for i in range(300)))
    spec = CalibrationDataSpec(path=str(path), samples=16, seq_len=32, seed=3)
    first = load_calibration(spec, tok)
    assert torch.equal(first, load_calibration(spec, tok))
    same = CalibrationDataSpec(path=str(path), samples=16, seq_len=32, seed=3)  # an equal, new spec
    assert torch.equal(first, load_calibration(same, tok))
    other = CalibrationDataSpec(path=str(path), samples=16, seq_len=32, seed=4)
    assert not torch.equal(first, load_calibration(other, tok))


def test_edited_file_gives_new_data(tmp_path: Path, tok) -> None:
    path = tmp_path / "calib.jsonl"
    spec = CalibrationDataSpec(path=str(path), samples=2, seq_len=8)
    _write_jsonl(path, [{"text": "a" * 40}])
    assert set(tok.decode(load_calibration(spec, tok).flatten())) == {"a"}
    _write_jsonl(path, [{"text": "b" * 40}])
    assert set(tok.decode(load_calibration(spec, tok).flatten())) == {"b"}


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("samples", 0, "samples must be >= 1"),
        ("seq_len", 1, "seq_len must be >= 2"),
        ("samples", True, "samples must be an integer"),
        ("seed", 1.5, "seed must be an integer"),
        ("text_field", "", "text_field must be a non-empty string"),
        ("messages_field", "", "messages_field must be None or a non-empty string"),
    ],
)
def test_spec_validation(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CalibrationDataSpec(**{field: value})


def test_spec_accepts_a_pathlike(tmp_path: Path) -> None:
    assert CalibrationDataSpec(path=tmp_path / "x.txt").path == str(tmp_path / "x.txt")


def test_missing_path(tmp_path: Path, tok) -> None:
    with pytest.raises(DataError, match=r"absent\.jsonl does not exist"):
        load_calibration(CalibrationDataSpec(path=str(tmp_path / "absent.jsonl")), tok)


def test_unsupported_suffix_lists_supported(tmp_path: Path, tok) -> None:
    path = tmp_path / "calib.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"calib\.csv.*'\.csv'") as info:
        load_calibration(CalibrationDataSpec(path=str(path)), tok)
    assert all(suffix in str(info.value) for suffix in SUPPORTED_SUFFIXES)


def test_plain_directory_is_not_a_dataset(tmp_path: Path, tok) -> None:
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder is not a dataset written by datasets' save_to_disk"):
        load_calibration(CalibrationDataSpec(path=str(tmp_path / "folder")), tok)


def test_missing_text_field_lists_columns(tmp_path: Path, tok) -> None:
    path = _write_jsonl(tmp_path / "calib.jsonl", [{"body": "x", "id": 1}])
    message = r"calib\.jsonl has no column 'text' \(text_field\).*\['body', 'id'\]"
    with pytest.raises(DataError, match=message):
        load_calibration(CalibrationDataSpec(path=str(path)), tok)


def test_non_string_text_names_row_and_field(tmp_path: Path, tok) -> None:
    path = _write_jsonl(tmp_path / "calib.jsonl", [{"text": ["a", "b"]}])
    with pytest.raises(DataError, match=r"calib\.jsonl, line 1: field 'text' \(text_field\) must be a string"):
        load_calibration(CalibrationDataSpec(path=str(path)), tok)


def test_missing_messages_field(tmp_path: Path, tok) -> None:
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"text": "x"}])
    message = r"chat\.jsonl has no column 'conversation' \(messages_field\).*\['text'\]"
    with pytest.raises(DataError, match=message):
        load_calibration(CalibrationDataSpec(path=str(path), messages_field="conversation"), tok)


def test_messages_without_chat_template(tmp_path: Path, tok) -> None:
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl: messages_field 'messages' .* no chat template"):
        load_calibration(CalibrationDataSpec(path=str(path), messages_field="messages"), tok)


def test_malformed_messages_name_the_row(tmp_path: Path, tok) -> None:
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = CHAT_TEMPLATE
    rows = [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": "hi"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match=r"chat\.jsonl, line 2 \(field 'messages'\): must be a list"):
        load_calibration(CalibrationDataSpec(path=str(path), messages_field="messages"), chat_tok)


@pytest.mark.parametrize("content", ["", '{"text": ""}\n{"text": null}\n'])
def test_empty_data(tmp_path: Path, tok, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty\.jsonl .*0 documents"):
        load_calibration(CalibrationDataSpec(path=str(path)), tok)


def test_fewer_tokens_than_seq_len(tmp_path: Path, tok) -> None:
    path = tmp_path / "short.txt"
    path.write_text("x" * 10)
    message = r"short\.txt is too short: 10 tokens give 0 .*seq_len 16.*seq_len to at most 10"
    with pytest.raises(DataError, match=message):
        load_calibration(CalibrationDataSpec(path=str(path), samples=1, seq_len=16), tok)


def test_fewer_windows_than_samples(tmp_path: Path, tok) -> None:
    path = tmp_path / "short.txt"
    path.write_text("x" * 100)
    message = (
        r"short\.txt .*100 tokens give 6 .*samples = 7\. "
        r"Lower samples to at most 6 or seq_len to at most 14"
    )
    with pytest.raises(DataError, match=message):
        load_calibration(CalibrationDataSpec(path=str(path), samples=7, seq_len=16), tok)
    assert load_calibration(CalibrationDataSpec(path=str(path), samples=6, seq_len=16), tok).shape == (6, 16)
    assert load_calibration(CalibrationDataSpec(path=str(path), samples=7, seq_len=14), tok).shape == (7, 14)


def test_unreachable_hub_dataset_suggests_path(tok, monkeypatch) -> None:
    def offline(name, **kwargs):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = r"dataset 'org/calib' \(split 'train'\) could not be loaded.*offline.*path"
    with pytest.raises(DataError, match=message):
        load_calibration(CalibrationDataSpec(dataset="org/calib"), tok)


def test_summary_is_a_frozen_record() -> None:
    summary = CalibrationSummary("p", "file", "text", False, 1, 10, 2, 2, 5, 0)
    with pytest.raises(AttributeError):
        summary.tokens = 3  # type: ignore[misc]
    assert summary.to_dict()["windows_available"] == 2
