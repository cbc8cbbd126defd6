"""Benchmark data loading: text, multiple-choice items, tokenization, error messages."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import datasets
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from dsq.tools.testing import byte_bpe_tokenizer
from dsq.core.errors import DataError
from dsq.eval.data import MCItem, load_multiple_choice, load_text, tokenize_text


def _tokenizer() -> PreTrainedTokenizerFast:
    return byte_bpe_tokenizer(["the quick brown fox jumps over the lazy dog. " * 20], 300)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_load_text_txt_keeps_the_whole_document(tmp_path: Path) -> None:
    path = tmp_path / "held_out.txt"
    path.write_text("first line\nsecond line\n\nthird paragraph\n")
    assert load_text(path) == "first line\nsecond line\n\nthird paragraph\n"


def test_load_text_jsonl_and_parquet_join_records(tmp_path: Path) -> None:
    jsonl = _write_jsonl(tmp_path / "held_out.jsonl", [{"text": "alpha"}, {"text": "beta"}])
    assert load_text(jsonl) == "alpha\n\nbeta"
    parquet = tmp_path / "held_out.parquet"
    datasets.Dataset.from_dict({"text": ["one", "two"]}).to_parquet(str(parquet))
    assert load_text(parquet) == "one\n\ntwo"


@pytest.mark.parametrize("content", [None, ""])
def test_load_text_missing_or_empty_file_names_the_file(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "absent.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match="absent.txt"):
        load_text(path)


def test_load_text_jsonl_without_text_field(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"body": "x"}])
    with pytest.raises(DataError, match=r"bad\.jsonl.*'text'"):
        load_text(path)


def test_loading_does_not_touch_the_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    path = _write_jsonl(tmp_path / "mc.jsonl", [{"context": "c", "choices": [" a", " b"], "gold": 0}])
    assert load_multiple_choice(path) == [MCItem(context="c", choices=(" a", " b"), gold=0)]


def test_load_multiple_choice_reads_items_and_limit(tmp_path: Path) -> None:
    rows = [{"context": f"q{i}", "choices": [" a", " b", " c"], "gold": i % 3} for i in range(5)]
    path = _write_jsonl(tmp_path / "mc.jsonl", rows)
    items = load_multiple_choice(path)
    assert len(items) == 5 and items[4] == MCItem(context="q4", choices=(" a", " b", " c"), gold=1)
    assert [item.context for item in load_multiple_choice(path, limit=2)] == ["q0", "q1"]


GOOD_ROW = '{"context": "c", "choices": [" a", " b"], "gold": 0}'


@pytest.mark.parametrize(
    ("bad_line", "fragment"),
    [
        ('{"context": "c", "choices": [" a", " b"], "gold": 2}', "field 'gold' = 2 is out of range for 2 choices"),
        ('{"context": "c", "choices": [" a", " b"], "gold": -1}', "field 'gold' = -1 is out of range"),
        ('{"context": "c", "choices": [" a", " b"], "gold": "0"}', "field 'gold' must be an integer index into 'choices', got '0'"),
        ('{"context": "c", "choices": [" a", " b"], "gold": 1.0}', "field 'gold' must be an integer index into 'choices', got 1.0"),
        ('{"context": "c", "choices": [" a", " b"], "gold": true}', "field 'gold' must be an integer index into 'choices', got True"),
        ('{"context": "c", "choices": [" a"], "gold": 0}', "field 'choices' needs at least 2 choices"),
        ('{"context": "c", "choices": [" a", 7], "gold": 0}', "field 'choices' must be a list of strings"),
        ('{"context": "c", "choices": " a b", "gold": 0}', "field 'choices' must be a list of strings"),
        ('{"context": "c", "choices": [" a", ""], "gold": 0}', "field 'choices' contains an empty choice"),
        ('{"context": 7, "choices": [" a", " b"], "gold": 0}', "field 'context' must be a string, got 7"),
        ('{"choices": [" a", " b"], "gold": 0}', "missing field 'context'"),
        ('[1, 2]', "each line must be a JSON object"),
        ('{not json', "not a JSON object"),
    ],
)
def test_multiple_choice_errors_name_file_line_and_field(tmp_path: Path, bad_line: str, fragment: str) -> None:
    # a blank line before the bad one: the message must count it (the bad row is on line 4)
    path = tmp_path / "items.jsonl"
    path.write_text(f"{GOOD_ROW}\n\n{GOOD_ROW}\n{bad_line}\n{GOOD_ROW}\n")
    with pytest.raises(DataError) as info:
        load_multiple_choice(path)
    message = str(info.value)
    assert message.startswith(f"benchmark file {path}, line 4: ") and fragment in message


def test_multiple_choice_items_remember_their_line(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text(f"\n{GOOD_ROW}\n\n{GOOD_ROW}\n")
    items = load_multiple_choice(path)
    assert [item.origin for item in items] == [f"{path}, line 2", f"{path}, line 4"]
    assert items[0] == MCItem(context="c", choices=(" a", " b"), gold=0)  # the origin is not part of equality


def test_scoring_errors_name_the_items_file_and_line(tmp_path: Path) -> None:
    from dsq.eval.multiple_choice import FewShot, fewshot_prompts

    path = tmp_path / "items.jsonl"
    other = GOOD_ROW.replace('"c"', '"d"')
    path.write_text(f"\n{GOOD_ROW}\n{other}\n")
    items = load_multiple_choice(path)
    with pytest.raises(DataError, match=rf"exemplars of multiple-choice item 0 \({path}, line 2\)"):
        fewshot_prompts(items, FewShot(num_fewshot=2, source=str(path)))


def test_multiple_choice_non_utf8_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_bytes(GOOD_ROW.encode() + b"\n" + b'{"context": "\xff"}\n')
    with pytest.raises(DataError, match=r"items\.jsonl, line 2: not UTF-8"):
        load_multiple_choice(path)


def test_multiple_choice_unparsable_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"context": "c", "choices": [" a", " b"], "gold": 0}\n{not json\n')
    with pytest.raises(DataError, match="broken.jsonl"):
        load_multiple_choice(path)


def test_tokenize_text_adds_only_an_optional_bos() -> None:
    tokenizer = byte_bpe_tokenizer(["the quick brown fox jumps over the lazy dog. " * 20], 300, prepend_bos=True)
    plain = tokenizer("the lazy dog", add_special_tokens=False)["input_ids"]
    with_bos = tokenize_text(tokenizer, "the lazy dog")
    assert with_bos.dtype == torch.long and with_bos.dim() == 1
    assert with_bos.tolist() == [tokenizer.bos_token_id, *plain]
    assert tokenize_text(tokenizer, "the lazy dog", add_bos=False).tolist() == plain
    assert tokenize_text(tokenizer, "the lazy dog", max_tokens=2).tolist() == [tokenizer.bos_token_id, plain[0]]
