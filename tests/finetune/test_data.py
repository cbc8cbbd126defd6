"""Fine-tuning data: sources, packing, prompt masking, padding, splits and error messages."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dsq.assets import data_file
from dsq.core.checkpoint import bundled_model_path
from dsq.core.errors import DataError
from dsq.finetune.data import (
    InstructionFields,
    TextFields,
    TokenBlocks,
    TrainDataSpec,
    TrainingData,
    load_training_data,
    split_documents,
)
from dsq.finetune.packing import IGNORE_INDEX
from dsq.tools.testing import make_tiny_tokenizer

# Renders each message on its own, so every prefix of a chat renders as a prefix of the whole.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """Byte BPE with bos 0, eos 1, pad 2 (and no chat template)."""
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def chat_tok(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    chat = copy.deepcopy(tok)
    chat.chat_template = CHAT_TEMPLATE
    return chat


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _docs(count: int, words: int = 12) -> list[str]:
    """Distinct documents whose text tells them apart."""
    return [" ".join(f"doc{i}w{j}" for j in range(words)) for i in range(count)]


def _ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _doc_stream(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> list[int]:
    """Expected packed stream: ``[bos] doc [eos]`` per document."""
    return [i for d in docs for i in [tokenizer.bos_token_id, *_ids(tokenizer, d), tokenizer.eos_token_id]]


def _block_texts(tokenizer: PreTrainedTokenizerFast, blocks: TokenBlocks) -> list[str]:
    """Decoded attended tokens of each (unpacked) block, without special tokens."""
    return [
        tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
        for ids, mask in zip(blocks.input_ids, blocks.attention_mask)
    ]


def _load(tokenizer, train, **kwargs) -> TrainingData:
    return load_training_data(TrainDataSpec(train=train, **kwargs), tokenizer)


# --- plain text and packing -------------------------------------------------------------------


def test_packing_gives_full_blocks_with_every_token_scored(tmp_path: Path, tok) -> None:
    docs = _docs(10)
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    data = _load(tok, path, seq_len=32, val_fraction=0.0)
    stream = _doc_stream(tok, docs)
    blocks = len(stream) // 32
    assert data.train.input_ids.shape == (blocks, 32) and data.train.input_ids.dtype == torch.int64
    assert torch.equal(data.train.labels, data.train.input_ids)
    assert bool((data.train.attention_mask == 1).all())
    assert len(data.train) == blocks and data.train.scored_tokens() == blocks * 32
    summary = data.summary
    assert summary.train.tokens == len(stream) and summary.train.dropped_tokens == len(stream) - blocks * 32
    assert summary.train.scored_share == 1.0 and summary.format == "text" and not summary.chat_template
    assert summary.validation_from == "none" and len(data.validation) == 0
    assert data.validation.input_ids.shape == (0, 32)


def test_documents_are_bos_text_eos_in_file_order(tmp_path: Path, tok) -> None:
    docs = _docs(6)
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    data = _load(tok, path, seq_len=16, val_fraction=0.0)
    flat = data.train.input_ids.flatten().tolist()
    assert flat == _doc_stream(tok, docs)[: len(flat)]
    assert flat.count(tok.eos_token_id) >= 5  # an EOS closes each document inside the kept blocks


def test_blocks_are_deterministic(tmp_path: Path, tok) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _docs(20)])
    first, second = _load(tok, path, seq_len=16, seed=3), _load(tok, path, seq_len=16, seed=3)
    for name in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(getattr(first.train, name), getattr(second.train, name))
        assert torch.equal(getattr(first.validation, name), getattr(second.validation, name))
    assert first.summary == second.summary


# --- instruction data -------------------------------------------------------------------------


def test_prompt_response_without_template_masks_exactly_the_prompt(tmp_path: Path, tok) -> None:
    rows = [{"prompt": "Question: what is 2 + 2?", "response": "Answer: 4"}]
    path = _write_jsonl(tmp_path / "qa.jsonl", rows)
    data = _load(tok, path, fields=InstructionFields(), seq_len=64, pack=False, val_fraction=0.0)
    prompt = [tok.bos_token_id, *_ids(tok, "Question: what is 2 + 2?\n")]
    response = [*_ids(tok, "Answer: 4"), tok.eos_token_id]
    length = len(prompt) + len(response)
    assert data.train.input_ids[0, :length].tolist() == prompt + response
    assert data.train.labels[0, :length].tolist() == [IGNORE_INDEX] * len(prompt) + response
    assert data.train.scored_tokens() == len(response)
    assert not data.summary.chat_template and data.summary.fields == ("prompt", "response")


def test_prompt_response_with_template_is_a_user_assistant_chat(tmp_path: Path, chat_tok) -> None:
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"q": "Name a prime.", "a": "Seven."}])
    fields = InstructionFields(prompt_field="q", response_field="a")
    data = _load(chat_tok, path, fields=fields, seq_len=64, pack=False, val_fraction=0.0)
    prompt = _ids(chat_tok, "<|user|>Name a prime.<|assistant|>")
    response = _ids(chat_tok, "Seven.</s>")
    assert response[-1] == chat_tok.eos_token_id  # the template's EOS; none is added twice
    length = len(prompt) + len(response)
    assert data.train.input_ids[0, :length].tolist() == prompt + response
    assert data.train.labels[0, :length].tolist() == [IGNORE_INDEX] * len(prompt) + response
    assert int(data.train.attention_mask[0].sum()) == length
    assert data.summary.chat_template and data.summary.format == "prompt_response"


def test_messages_score_only_assistant_turns(tmp_path: Path, chat_tok) -> None:
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six."},
    ]
    unanswered = [{"role": "user", "content": "Hello?"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}, {"messages": unanswered}])
    fields = InstructionFields(messages_field="messages")
    data = _load(chat_tok, path, fields=fields, seq_len=128, pack=False, val_fraction=0.0)
    pieces = [
        ("<|system|>Be brief.<|user|>Two plus two?<|assistant|>", False),
        ("Four.</s>", True),
        ("<|user|>And three plus three?<|assistant|>", False),
        ("Six.</s>", True),
    ]
    ids = [i for text, _ in pieces for i in _ids(chat_tok, text)]
    labels = [i if scored else IGNORE_INDEX for text, scored in pieces for i in _ids(chat_tok, text)]
    assert len(data.train) == 1  # the chat without an assistant turn has nothing to score: dropped
    assert data.train.input_ids[0, : len(ids)].tolist() == ids
    assert data.train.labels[0, : len(ids)].tolist() == labels
    assert data.summary.train.documents == 2 and data.summary.train.unscored_blocks == 1
    assert data.summary.fields == ("messages",) and data.summary.format == "messages"


def test_packed_instruction_blocks_keep_the_masks(tmp_path: Path, tok) -> None:
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(12)]
    path = _write_jsonl(tmp_path / "qa.jsonl", rows)
    data = _load(tok, path, fields=InstructionFields(), seq_len=24, val_fraction=0.0)
    expected_ids: list[int] = []
    expected_labels: list[int] = []
    for row in rows:
        prompt = [tok.bos_token_id, *_ids(tok, row["prompt"] + "\n")]
        response = [*_ids(tok, row["response"]), tok.eos_token_id]
        expected_ids += prompt + response
        expected_labels += [IGNORE_INDEX] * len(prompt) + response
    kept = data.train.input_ids.numel()
    assert kept == len(expected_ids) // 24 * 24
    assert data.train.input_ids.flatten().tolist() == expected_ids[:kept]
    assert data.train.labels.flatten().tolist() == expected_labels[:kept]
    assert 0 < data.summary.train.scored_share < 1


# --- pack=False -------------------------------------------------------------------------------


def test_unpacked_blocks_are_right_padded_and_truncated(tmp_path: Path, tok) -> None:
    docs = ["short one", "a bit longer document here", "x" * 200]
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    data = _load(tok, path, seq_len=20, pack=False, val_fraction=0.0)
    lengths = [min(len(_ids(tok, d)) + 2, 20) for d in docs]
    assert data.train.input_ids.shape == (3, 20)
    assert data.train.attention_mask.sum(dim=1).tolist() == lengths
    padding = data.train.attention_mask == 0
    assert bool((data.train.input_ids[padding] == tok.pad_token_id).all())
    assert bool((data.train.labels[padding] == IGNORE_INDEX).all())
    assert torch.equal(data.train.labels[~padding], data.train.input_ids[~padding])
    assert data.summary.train.truncated_examples == 1
    assert data.summary.train.dropped_tokens == len(_ids(tok, docs[2])) + 2 - 20


# --- train/validation split -------------------------------------------------------------------


def test_held_out_documents_do_not_overlap_training_documents(tmp_path: Path, tok) -> None:
    docs = _docs(20)
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    data = _load(tok, path, seq_len=128, pack=False, val_fraction=0.1, seed=0)
    train, validation = _block_texts(tok, data.train), _block_texts(tok, data.validation)
    assert len(validation) == 2 and len(train) == 18
    assert set(train).isdisjoint(validation) and set(train) | set(validation) == set(docs)
    assert data.summary.validation_from == "held_out" and data.summary.validation.documents == 2
    other_seed = _block_texts(tok, _load(tok, path, seq_len=128, pack=False, seed=1).validation)
    assert set(other_seed) != set(validation)  # the seed picks the held-out documents


def test_at_least_one_document_is_held_out(tmp_path: Path, tok) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _docs(5)])
    data = _load(tok, path, seq_len=64, pack=False, val_fraction=0.01)
    assert len(data.validation) == 1 and len(data.train) == 4


def test_separate_validation_file_replaces_the_held_out_share(tmp_path: Path, tok) -> None:
    train_docs, val_docs = _docs(8), [f"validation text number {i} " * 4 for i in range(3)]
    train = _write_jsonl(tmp_path / "train.jsonl", [{"text": d} for d in train_docs])
    val = _write_jsonl(tmp_path / "val.jsonl", [{"text": d} for d in val_docs])
    data = _load(tok, train, validation=val, seq_len=64, pack=False, val_fraction=0.5)
    assert sorted(_block_texts(tok, data.train)) == sorted(train_docs)  # nothing held out of train
    assert _block_texts(tok, data.validation) == val_docs
    assert data.summary.validation_from == "file" and data.summary.val_fraction is None
    assert data.summary.validation.source == str(val.resolve())


# --- sources ----------------------------------------------------------------------------------


def test_all_sources_give_the_same_blocks(tmp_path: Path, tok) -> None:
    docs = _docs(9)
    txt = tmp_path / "d.txt"
    txt.write_text("\f".join(docs))
    jsonl = _write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(parquet))
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    other = datasets.Dataset.from_dict({"text": ["not this split"]})
    splits = datasets.DatasetDict({"train": other, "extra": datasets.Dataset.from_dict({"text": docs})})
    splits.save_to_disk(str(tmp_path / "dd"))
    reference = _load(tok, jsonl, seq_len=16)
    sources = ((txt, "train"), (parquet, "train"), (tmp_path / "ds", "train"), (tmp_path / "dd", "extra"))
    for source, split in sources:
        data = _load(tok, source, split=split, seq_len=16)
        assert torch.equal(data.train.input_ids, reference.train.input_ids), source
        assert torch.equal(data.validation.input_ids, reference.validation.input_ids), source
    assert _load(tok, txt, seq_len=16).summary.fields == ()  # a .txt file has no columns


def test_txt_documents_split_at_form_feeds_or_grouped_paragraphs() -> None:
    assert split_documents("one\ftwo\n\f \f three") == ["one", "two\n", " three"]
    paragraphs = [f"paragraph {i} " + "x" * 30 for i in range(10)]
    text = "\n\n".join(paragraphs[:5]) + "\n \n\n" + "\n\n".join(paragraphs[5:])
    documents = split_documents(text, min_chars=100)
    assert all(len(d) >= 100 for d in documents) and len(documents) == 3
    assert all(d in text for d in documents)  # exact slices of the file
    assert "".join(documents).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")
    assert split_documents("short\n\nfile", min_chars=100) == ["short\n\nfile"]


def test_txt_file_without_form_feeds_gives_grouped_documents(tmp_path: Path, tok) -> None:
    path = tmp_path / "p.txt"
    path.write_text("\n\n".join(f"paragraph {i} " + "word " * 100 for i in range(40)))
    data = _load(tok, path, seq_len=64)
    documents = len(split_documents(path.read_text()))
    assert documents > 5  # ~520-character paragraphs grouped to >= 2000 characters
    assert data.summary.train.documents + data.summary.validation.documents == documents


def test_bundled_domain_files_load_with_the_bundled_tokenizer() -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_path()))
    spec = TrainDataSpec(
        train=data_file("domain_train.txt"), validation=data_file("domain_heldout.txt"), seq_len=256
    )
    data = load_training_data(spec, tokenizer)
    assert data.train.input_ids.shape[1] == 256 and len(data.train) > 100 and len(data.validation) > 10
    assert int(data.train.input_ids.max()) < len(tokenizer)
    train_docs = set(split_documents(data_file("domain_train.txt").read_text(encoding="utf-8")))
    heldout_docs = set(split_documents(data_file("domain_heldout.txt").read_text(encoding="utf-8")))
    assert len(train_docs) == data.summary.train.documents > 20
    assert train_docs.isdisjoint(heldout_docs)
    assert json.loads(json.dumps(data.summary.to_dict())) == data.summary.to_dict()


# --- errors -----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path, tok) -> None:
    with pytest.raises(DataError, match=r"train file .*nope\.jsonl does not exist"):
        _load(tok, tmp_path / "nope.jsonl")
    train = _write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _docs(4)])
    with pytest.raises(DataError, match=r"validation file .*gone\.txt does not exist"):
        _load(tok, train, validation=tmp_path / "gone.txt")


def test_unsupported_suffix(tmp_path: Path, tok) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"train file .*d\.csv: unsupported suffix '\.csv'.*\.jsonl"):
        _load(tok, path)


def test_empty_data(tmp_path: Path, tok) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match=r"train file .*empty\.txt is empty"):
        _load(tok, empty)
    blank = _write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": None}])
    with pytest.raises(DataError, match=r"train file .*blank\.jsonl is empty: no documents in field\(s\) text"):
        _load(tok, blank)


def test_missing_column_lists_the_columns(tmp_path: Path, tok) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"body": "hello", "id": 1}])
    columns = r"d\.jsonl has no column 'text' \(fields\.text_field\); columns: \['body', 'id'\]"
    with pytest.raises(DataError, match=columns):
        _load(tok, path)
    with pytest.raises(DataError, match=r"d\.jsonl has no column 'prompt' \(fields\.prompt_field\)"):
        _load(tok, path, fields=InstructionFields(response_field="body"))


def test_instruction_fields_need_a_table(tmp_path: Path, tok) -> None:
    path = tmp_path / "d.txt"
    path.write_text("plain text")
    with pytest.raises(DataError, match=r"train file .*d\.txt: a \.txt file holds plain text"):
        _load(tok, path, fields=InstructionFields())


def test_no_scored_tokens(tmp_path: Path, chat_tok) -> None:
    rows = [{"messages": [{"role": "user", "content": f"question number {i} " * 3}]} for i in range(8)]
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match=r"train file .*chat\.jsonl gives no scored tokens"):
        _load(chat_tok, path, fields=InstructionFields(messages_field="messages"), seq_len=16, val_fraction=0.0)


def test_too_few_tokens_for_one_block(tmp_path: Path, tok) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "tiny"}, {"text": "data"}])
    tokens = 2 * 2 + len(_ids(tok, "tiny")) + len(_ids(tok, "data"))
    short = rf"train file .*d\.jsonl is too short: {tokens} tokens in 2 document\(s\), fewer than .* seq_len 4096"
    with pytest.raises(DataError, match=short):
        _load(tok, path, seq_len=4096, val_fraction=0.0)
    letters = _write_jsonl(tmp_path / "letters.jsonl", [{"text": c} for c in "abcd"])  # 3 tokens each
    held_short = r"held out of train file .*letters\.jsonl is too short: 3 tokens in 1 doc.*raise val_fraction"
    with pytest.raises(DataError, match=held_short):
        _load(tok, letters, seq_len=4, val_fraction=0.25)


def test_validation_set_empty(tmp_path: Path, tok, chat_tok) -> None:
    train = _write_jsonl(tmp_path / "train.jsonl", [{"text": d} for d in _docs(4)])
    blank = _write_jsonl(tmp_path / "val.jsonl", [{"text": ""}])
    with pytest.raises(DataError, match=r"validation file .*val\.jsonl is empty"):
        _load(tok, train, validation=blank)
    single = _write_jsonl(tmp_path / "one.jsonl", [{"text": "only one document here"}])
    with pytest.raises(DataError, match=r"one\.jsonl holds 1 document\(s\): too few to hold out"):
        _load(tok, single, seq_len=4)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    chats = _write_jsonl(tmp_path / "chats.jsonl", [{"m": chat}] * 4)
    unanswered = _write_jsonl(tmp_path / "unanswered.jsonl", [{"m": [{"role": "user", "content": "hi"}]}])
    fields = InstructionFields(messages_field="m")
    with pytest.raises(DataError, match=r"validation set is empty: validation file .*unanswered\.jsonl"):
        _load(chat_tok, chats, validation=unanswered, fields=fields, seq_len=64, pack=False)


def test_messages_must_be_role_content_dicts(tmp_path: Path, chat_tok) -> None:
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"m": good}, {"m": [{"role": "user"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl, line 2 \(field 'm'\): must be a list of"):
        _load(chat_tok, path, fields=InstructionFields(messages_field="m"), seq_len=8)


def test_messages_need_a_chat_template(tmp_path: Path, tok) -> None:
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"m": chat}])
    message = r"train file .*chat\.jsonl: fields\.messages_field 'm' is set but .*no chat template"
    with pytest.raises(DataError, match=message):
        _load(tok, path, fields=InstructionFields(messages_field="m"))


def test_prompt_and_response_must_be_strings(tmp_path: Path, tok) -> None:
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": None}]
    path = _write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(DataError, match=r"qa\.jsonl, line 2: field 'response' \(fields\.response_field\) must be"):
        _load(tok, path, fields=InstructionFields())


def test_missing_split_of_a_dataset_dict(tmp_path: Path, tok) -> None:
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"train directory .*dd has no split 'test' \(splits: \['train'\]\)"):
        _load(tok, tmp_path / "dd", split="test")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 1}, "seq_len must be >= 2"),
        ({"val_fraction": 1.0}, r"val_fraction must be a number in \[0, 1\)"),
        ({"fields": "text"}, "fields must be TextFields or InstructionFields"),
        ({"pack": "yes"}, "pack must be True or False"),
        ({"train": ""}, "train must be a non-empty path"),
    ],
)
def test_spec_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainDataSpec(**{"train": "d.txt", **kwargs})


def test_fields_validation_and_token_blocks_shape_check() -> None:
    with pytest.raises(ValueError, match="messages_field must be a non-empty string"):
        InstructionFields(messages_field="")
    with pytest.raises(ValueError, match="text_field must be a non-empty string"):
        TextFields(text_field="")
    ids = torch.zeros((2, 4), dtype=torch.int64)
    with pytest.raises(ValueError, match="labels must be a 2-D int64 tensor of shape"):
        TokenBlocks(ids, torch.zeros((2, 3), dtype=torch.int64), ids)


def test_templates_that_rewrite_earlier_turns_are_refused(tmp_path: Path, chat_tok) -> None:
    rewriting = copy.deepcopy(chat_tok)
    # "<end>" follows the last message only, so a rendered prefix is not a prefix of the whole chat
    rewriting.chat_template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}<end>{% endif %}{% endfor %}"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"m": chat}])
    with pytest.raises(DataError, match=r"chat\.jsonl, line 1 \(field 'm'\): the chat template does not render"):
        _load(rewriting, path, fields=InstructionFields(messages_field="m"), val_fraction=0.0)
