"""Token streams of every data path equal transformers' own ``tokenizer(text)`` for the tokenizers checkpoints ship."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dsq.cli import main
from dsq.eval.data import MCItem, tokenize_text
from dsq.eval.multiple_choice import _requests
from dsq.finetune.data import TextFields, TrainDataSpec, load_training_data
from dsq.quantize.calibration_data import CalibrationDataSpec, load_calibration
from dsq.tools.testing import _TOKENIZER_TEXT, byte_bpe_tokenizer, make_tiny_checkpoint, write_sentencepiece_tokenizer

pytest.importorskip("sentencepiece")

DOCS = ("The quick brown fox jumps over the lazy dog.", "Numbers: 0 1 2 3, and a café.")


def _sentencepiece(root: Path, **flags) -> AutoTokenizer:
    return AutoTokenizer.from_pretrained(write_sentencepiece_tokenizer(root / "sp", **flags))


def _converted(root: Path) -> AutoTokenizer:
    """tokenizer.json converted from tokenizer.model by transformers, reloaded without the .model file."""
    _sentencepiece(root).save_pretrained(root / "fast")
    assert not (root / "fast" / "tokenizer.model").exists() and (root / "fast" / "tokenizer.json").exists()
    return AutoTokenizer.from_pretrained(root / "fast")


def _bpe(root: Path, prepend_bos: bool) -> AutoTokenizer:
    byte_bpe_tokenizer(_TOKENIZER_TEXT, 400, prepend_bos=prepend_bos).save_pretrained(root / "bpe")
    return AutoTokenizer.from_pretrained(root / "bpe")


# kind -> (build, ids added before a text, whether an EOS ends a text)
KINDS = {
    "sentencepiece model only": (lambda root: _sentencepiece(root), 1, False),
    "sentencepiece with eos": (lambda root: _sentencepiece(root, add_eos=True), 1, True),
    "sentencepiece converted to tokenizer.json": (_converted, 1, False),
    "bpe with bos": (lambda root: _bpe(root, True), 1, False),
    "bpe without bos": (lambda root: _bpe(root, False), 0, False),
}


@pytest.fixture(params=list(KINDS), scope="module")
def tokenizer_kind(request, tmp_path_factory):
    build, prefix, ends_with_eos = KINDS[request.param]
    tokenizer = build(tmp_path_factory.mktemp("tok"))
    return tokenizer, prefix, ends_with_eos


def test_reference_encodings(tokenizer_kind) -> None:
    """The tokenizers themselves add BOS / EOS as the table says (so the other tests cover each case)."""
    tokenizer, prefix, ends_with_eos = tokenizer_kind
    ids = tokenizer(DOCS[0])["input_ids"]
    assert ids[:prefix] == [tokenizer.bos_token_id] * prefix and ids[prefix] != tokenizer.bos_token_id
    assert (ids[-1] == tokenizer.eos_token_id) == ends_with_eos


def test_perplexity_stream(tokenizer_kind) -> None:
    tokenizer, prefix, _ = tokenizer_kind
    text = "\n\n".join(DOCS)
    expected = tokenizer(text)["input_ids"]
    assert tokenize_text(tokenizer, text).tolist() == expected
    assert tokenize_text(tokenizer, text, add_bos=False).tolist() == expected[prefix:]
    assert tokenize_text(tokenizer, text, 5).tolist() == expected[:5]


def test_calibration_stream(tokenizer_kind, tmp_path: Path) -> None:
    """Documents as the tokenizer encodes them, joined by EOS where one does not already end a document."""
    tokenizer, _, ends_with_eos = tokenizer_kind
    first, second = (tokenizer(doc)["input_ids"] for doc in DOCS)
    expected = first + ([] if ends_with_eos else [tokenizer.eos_token_id]) + second
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in DOCS))
    # One window as long as the whole stream: no slack, so the window is the stream itself.
    ids = load_calibration(CalibrationDataSpec(path=str(data), samples=1, seq_len=len(expected)), tokenizer)
    assert ids.tolist() == [expected]


def test_training_stream(tokenizer_kind, tmp_path: Path) -> None:
    """A document is ``tokenizer(text)`` ending in one EOS, never two."""
    tokenizer, _, ends_with_eos = tokenizer_kind
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": DOCS[0]}) + "\n")
    spec = TrainDataSpec(train=data, fields=TextFields(), seq_len=64, val_fraction=0.0, pack=False)
    blocks = load_training_data(spec, tokenizer).train
    expected = tokenizer(DOCS[0])["input_ids"] + ([] if ends_with_eos else [tokenizer.eos_token_id])
    assert blocks.input_ids[0, : len(expected)].tolist() == expected
    assert int(blocks.attention_mask[0].sum()) == len(expected)


def test_multiple_choice_prefix(tokenizer_kind) -> None:
    """Context and choice are scored after exactly the tokenizer's own prefix (its BOS, if it adds one)."""
    tokenizer, _, ends_with_eos = tokenizer_kind
    item = MCItem(context="The quick brown fox", choices=(" jumps", " sleeps"), gold=0)
    for request, choice in zip(_requests(tokenizer, [item], True, None), item.choices):
        expected = tokenizer(item.context + choice)["input_ids"][: -1 if ends_with_eos else None]
        assert list(request.input_ids) + [request.continuation[-1]] == expected


def test_sentencepiece_only_checkpoint_runs(tmp_path: Path) -> None:
    """A tied-free Llama whose tokenizer is tokenizer.model alone goes through ``dsq run`` with RTN."""
    checkpoint = make_tiny_checkpoint("llama", tmp_path / "ckpt", bos_token_id=1, eos_token_id=2, pad_token_id=None)
    write_sentencepiece_tokenizer(checkpoint)
    assert not (checkpoint / "tokenizer.json").exists()
    out = tmp_path / "out"
    code = main([
        "run", str(Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"), f"model={checkpoint}", f"output={out}", "quantize.method=rtn",
        "quantize.weights.bits=8", "eval.perplexity.max_tokens=256", "eval.multiple_choice.limit=4",
        "eval.fidelity.max_tokens=256", "-q",
    ])
    assert code in (0, 1)  # 1: a gate failed on a random model; the run itself completed
    report = json.loads((out / "report.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert report["original"]["ppl"]["tokens"] == 255 and tokenizer("a")["input_ids"][0] == 1
