"""benchmarks/byo_checkpoint.py: the method table on any checkpoint, scored by its own perplexity loop."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsq.assets import data_file

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "byo_checkpoint.py"
_SPEC = importlib.util.spec_from_file_location("byo_checkpoint", _SCRIPT)
byo = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = byo  # dataclasses look their module up while the script runs
_SPEC.loader.exec_module(byo)

SEQ_LEN, MAX_TOKENS = 32, 160  # 5 windows, 155 scored tokens


def _plain_perplexity(checkpoint: Path, text: str) -> float:
    """The documented method, written out: tokenize once, whole windows, mean NLL of predictions, exp."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = tokenizer(text)["input_ids"][:MAX_TOKENS]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - SEQ_LEN + 1, SEQ_LEN):
            window = torch.tensor([ids[start : start + SEQ_LEN]])
            logprobs = model(input_ids=window).logits.log_softmax(-1)[0, :-1]  # (SEQ_LEN - 1, vocab)
            nll -= logprobs.gather(1, window[0, 1:, None]).sum().item()
            count += SEQ_LEN - 1
    return math.exp(nll / count)


def test_table_rows_and_fp_perplexity(tiny_checkpoint, tmp_path: Path, capsys) -> None:
    checkpoint = tiny_checkpoint("llama")
    out = tmp_path / "rows.json"
    argv = [str(checkpoint), str(data_file("heldout.txt")), "--methods", "rtn", "w8a8", "--samples", "2",
            "--seq-len", str(SEQ_LEN), "--max-tokens", str(MAX_TOKENS), "--json", str(out)]
    assert byo.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["scheme"]) for r in rows] == [("fp", "float32")] + [
        ("rtn", f"int4 {g} {s}") for g in ("g32", "g128", "channel") for s in ("sym", "asym")
    ] + [("w8a8", "int8 w, int8 dynamic per-token a, smoothquant 0.5")]
    fp = rows[0]
    assert fp["ppl"] == pytest.approx(_plain_perplexity(checkpoint, (data_file("heldout.txt")).read_text()), rel=1e-5)
    for row in rows[1:]:
        assert row["increase_pct"] == pytest.approx(100 * (row["ppl"] / fp["ppl"] - 1), abs=1e-9)
        assert 0 < row["weight_bytes"] < fp["weight_bytes"]
    printed = capsys.readouterr().out
    assert "155 scored tokens" in printed
    assert printed.count("\n| rtn | int4 ") == 6 and f"| fp | float32 | {fp['ppl']:.4f} | +0.00 |" in printed


@pytest.mark.parametrize(
    "which, message",
    [("checkpoint", "does not exist"), ("text", "does not exist"), ("calibration", "does not exist")],
)
def test_bad_paths_exit_2(tiny_checkpoint, tmp_path: Path, capsys, which: str, message: str) -> None:
    paths = {"checkpoint": tiny_checkpoint("llama"), "text": data_file("heldout.txt"), "calibration": None}
    paths[which] = tmp_path / "missing"
    argv = [str(paths["checkpoint"]), str(paths["text"]), "--methods", "gptq", "--samples", "1", "--seq-len", "16"]
    if paths["calibration"] is not None or which == "calibration":
        argv += ["--calibration", str(paths["calibration"])]
    assert byo.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0] and "missing" in err[0]
