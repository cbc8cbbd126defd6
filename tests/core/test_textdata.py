"""The one data reader and chat renderer: records, their lines, and messages naming file, line and field."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import pytest

from dsq.core.chat import chat_messages, render_chat, require_chat_template
from dsq.core.errors import DataError
from dsq.core.textdata import Location, read_file, read_records
from dsq.eval.data import load_text
from dsq.finetune.data import TrainDataSpec, load_training_data
from dsq.quantize.calibration_data import CalibrationDataSpec, load_calibration
from dsq.tools.testing import make_tiny_tokenizer

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m.name is defined %}@{{ m.name }}{% endif %};{% endfor %}"


@pytest.fixture(scope="module")
def chat_tok():
    tokenizer = copy.deepcopy(make_tiny_tokenizer())
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_records_name_the_line_of_a_json_lines_file_and_the_row_elsewhere(tmp_path: Path) -> None:
    jsonl = _lines(tmp_path / "d.jsonl", '{"text": "a"}', "", "  ", '{"text": "b", "n": 5}')
    records = read_records(jsonl, "train", "train")
    assert records.description == f"train file {jsonl}" and records.table.num_rows == 2
    assert records.where(1) == f"train file {jsonl}, line 4"
    with pytest.raises(DataError, match=r"d\.jsonl, line 4: field 'n' \(fields\.text_field\) must be a string, got 5"):
        records.texts("n", "fields.text_field", skip_missing=True)
    array = tmp_path / "d.json"
    array.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=1))
    assert read_records(array, "train", "train").where(1) == f"train file {array}, row 1"
    datasets.DatasetDict({"extra": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(tmp_path / "dd"))
    directory = read_records(tmp_path / "dd", "calibration", "extra")
    assert directory.where(0) == f"calibration directory {tmp_path / 'dd'} (split 'extra'), row 0"


def test_texts_keep_or_skip_missing_values(tmp_path: Path) -> None:
    records = read_records(_lines(tmp_path / "d.jsonl", '{"text": "a"}', '{"text": ""}', '{"text": null}'), "x", "train")
    assert records.texts("text", None, skip_missing=True) == ["a", ""]
    with pytest.raises(DataError, match=r"d\.jsonl, line 3: field 'text' must be a string, got None"):
        records.texts("text", None, skip_missing=False)
    with pytest.raises(DataError, match=r"d\.jsonl has no column 'body' \(text_field\); columns: \['text'\]"):
        records.texts("body", "text_field", skip_missing=True)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n', r"bad\.jsonl, line 3: not a JSON object \(Expecting ','"),
        ("first.jsonl", '{"text": "a"\n{"text": "b"}\n', r"first\.jsonl, line 1: not a JSON object"),
        ("list.jsonl", '{"text": "a"}\n["b"]\n', r"list\.jsonl, line 2: not a JSON object \(got a list\)"),
        ("mixed.jsonl", '{"text": "a"}\n\n{"text": ["b"]}\n', r"mixed\.jsonl, line 3: field 'text' is a list, but a string on line 1"),
        ("bad.json", '[\n {"text": "a"},\n {"text": "b"\n]\n', r"bad\.json, line 4: not valid JSON \(Expecting ','"),
        ("latin1.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"latin1\.jsonl, line 2: not UTF-8 text"),
        ("latin1.txt", b"first line\nsecond caf\xe9\n", r"latin1\.txt, line 2: not UTF-8 text"),
    ],
)
def test_unreadable_files_name_the_line(tmp_path: Path, name: str, content: str | bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for what in ("calibration", "train"):
        with pytest.raises(DataError, match=rf"^{what} file .*{message}"):
            read_records(path, what, "train").texts("text", None, skip_missing=True)
    with pytest.raises(DataError, match=rf"^benchmark file .*{message}"):
        load_text(path)


def test_a_byte_order_mark_is_not_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": 7}\n')
    records = read_records(path, "train", "train")
    with pytest.raises(DataError, match=r"bom\.jsonl, line 2: field 'text' must be a string, got 7"):
        records.texts("text", None, skip_missing=True)


def test_kinds_of_file_the_stages_accept(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"benchmark file .*folder is a directory, not a file$"):
        read_file(tmp_path / "folder", "benchmark")
    csv = _lines(tmp_path / "d.csv", "text", "a")
    with pytest.raises(DataError, match=r"unsupported suffix '\.csv'; supported: \.txt, \.jsonl, \.json, \.parquet$"):
        read_file(csv, "benchmark")
    with pytest.raises(DataError, match=r"unsupported suffix '\.csv'; .* or a directory written by datasets' save_to_disk"):
        read_records(csv, "train", "train")


def test_every_stage_reads_a_file_the_same_way(tmp_path: Path) -> None:
    path = _lines(tmp_path / "d.jsonl", '{"text": "alpha beta"}', "", '{"text": "gamma"}')
    records = read_records(path, "benchmark", "train")
    assert load_text(path) == "\n\n".join(records.texts("text", None, skip_missing=False)) == "alpha beta\n\ngamma"
    bad = _lines(tmp_path / "bad.jsonl", '{"text": "alpha"}', "", '{"text": ["beta"]}', '{"text": "gamma"}')
    tokenizer = make_tiny_tokenizer()
    for call in (
        lambda: load_text(bad),
        lambda: load_calibration(CalibrationDataSpec(path=str(bad), samples=1, seq_len=2), tokenizer),
        lambda: load_training_data(TrainDataSpec(train=bad, seq_len=2), tokenizer),
    ):
        with pytest.raises(DataError, match=r"bad\.jsonl, line 3: field 'text'"):
            call()


def test_chat_messages_check_the_shape_and_drop_missing_keys(tmp_path: Path, chat_tok) -> None:
    path = _lines(tmp_path / "chat.jsonl", json.dumps({"m": [{"role": "user", "content": "hi"}]}))
    where = Location(read_records(path, "train", "train"), 0, "m")
    messages = chat_messages([{"role": "user", "content": "hi", "name": None}], where)
    assert messages == [{"role": "user", "content": "hi"}]
    assert render_chat(chat_tok, messages, where) == "<|user|>hi;"  # ``name`` is not defined, not None
    for value in ("hi", [{"role": "user"}], [{"role": 1, "content": "x"}], [["user", "hi"]]):
        with pytest.raises(DataError, match=rf"^train file {path}, line 1 \(field 'm'\): must be a list of"):
            chat_messages(value, where)


def test_render_failures_and_missing_templates_name_the_record(tmp_path: Path, chat_tok) -> None:
    path = _lines(tmp_path / "chat.jsonl", "", json.dumps({"m": [{"role": "user", "content": "hi"}]}))
    where = Location(read_records(path, "calibration", "train"), 0, "m")
    failing = copy.deepcopy(chat_tok)
    failing.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(DataError, match=r"chat\.jsonl, line 2 \(field 'm'\): the chat template failed: only user turns"):
        render_chat(failing, [{"role": "user", "content": "hi"}], where)
    with pytest.raises(DataError, match=r"^why: m is set but the tokenizer .* has no chat template; do this$"):
        require_chat_template(make_tiny_tokenizer(), "why: m is set", "do this")
    require_chat_template(chat_tok, "why", "do this")

