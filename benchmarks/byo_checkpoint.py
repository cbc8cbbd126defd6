"""Bring your own checkpoint: every PTQ method of dsq on a local HF checkpoint, scored on your text.

Prints one Markdown table: the fp model, then RTN, GPTQ and AWQ (INT4, symmetric and asymmetric,
groups of 32 and 128 and per channel), W8A8 and bitsandbytes NF4. Each row gives the held-out
perplexity, its increase over the fp model, the bytes of all weights and the seconds the
quantization took.

Each row quantizes a fresh load of the checkpoint through dsq's public API (``quantize_`` with the
config a recipe with the same settings would build; calibrated methods get the same calibration
windows) and scores the model in memory: dsq's quantized modules compute with the dequantized
weights, as the saved artifact does when transformers reloads it.

Perplexity does not use dsq's evaluator, so the numbers compare with any toolkit's for the same
windows:

1. the whole text is tokenized once, ``tokenizer(text)["input_ids"]`` with the checkpoint's own
   tokenizer (so a BOS appears once, at the start, exactly where the tokenizer adds one, and never
   at the start of later windows);
2. ``--max-tokens`` keeps the first that many ids;
3. the ids are cut into non-overlapping windows of ``--seq-len`` tokens; the last partial window is
   dropped;
4. each window is one plain ``model(input_ids=window).logits`` forward (no attention mask, no KV
   cache); position ``i`` predicts token ``i + 1``, so a window scores ``seq_len - 1`` tokens;
5. perplexity is ``exp`` of the mean negative log-likelihood (nats) over all scored tokens.

    python benchmarks/byo_checkpoint.py CHECKPOINT_DIR HELDOUT.txt [--calibration CALIB.txt]
        [--methods rtn gptq awq w8a8 nf4] [--samples 128] [--seq-len 512] [--max-tokens 65536] [--json OUT]

Exit status 2 with one line on stderr when the checkpoint or a text file is missing or invalid.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from dsq.core.loading import load_checkpoint
from dsq.core.errors import DataError, DsqInputError
from dsq.eval.data import load_text
from dsq.quantize import quantize_
from dsq.quantize.api import tensor_bytes
from dsq.quantize.calibration_data import CalibrationDataSpec, load_calibration
from dsq.quantize.method import METHODS as REGISTRY
from dsq.quantize.sections import MethodSection, WeightsSection

METHODS = ("rtn", "gptq", "awq", "w8a8", "nf4")
"""Method names accepted by ``--methods``, in table order."""

_INT4_SCHEMES: tuple[tuple[str, dict], ...] = tuple(
    (f"int4 {gran} {'sym' if symmetric else 'asym'}", dict(bits=4, symmetric=symmetric, **fields))
    for gran, fields in (("g32", {"group_size": 32}), ("g128", {"group_size": 128}),
                         ("channel", {"granularity": "channel"}))
    for symmetric in (True, False)
)
_CALIBRATED = ("gptq", "awq", "w8a8")


@dataclass(frozen=True)
class Row:
    """One line of the table.

    Attributes:
        method: ``fp``, ``rtn``, ``gptq``, ``awq``, ``w8a8`` or ``nf4``.
        scheme: Weight (and activation) format.
        ppl: Perplexity on the held-out windows.
        increase_pct: Perplexity increase over the fp model, in percent.
        weight_bytes: Bytes of all weights (quantized ones with their scales and zero points).
        seconds: Wall time of the quantization (0 for the fp model).
    """

    method: str
    scheme: str
    ppl: float
    increase_pct: float
    weight_bytes: int
    seconds: float


def heldout_ids(tokenizer, text: str, max_tokens: int | None) -> torch.Tensor:
    """Tokenize the whole text once with the checkpoint's tokenizer (its own special tokens).

    Args:
        tokenizer: The checkpoint's Hugging Face tokenizer.
        text: Held-out text.
        max_tokens: Keep only the first ``max_tokens`` ids (``None``: all).

    Returns:
        1-D int64 ids.  # (tokens,)
    """
    ids = list(tokenizer(text, verbose=False)["input_ids"])
    return torch.tensor(ids[:max_tokens] if max_tokens is not None else ids, dtype=torch.long)


def window_perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int, batch_size: int = 4) -> float:
    """Perplexity over non-overlapping ``seq_len`` windows (last partial window dropped).

    Args:
        model: Causal LM called as ``model(input_ids=...).logits``.
        ids: 1-D token ids.  # (tokens,)
        seq_len: Tokens per window; each window scores ``seq_len - 1`` predictions.
        batch_size: Windows per forward.

    Returns:
        ``exp(mean NLL)`` over every scored token.

    Raises:
        DataError: The text holds fewer than ``seq_len`` tokens.
    """
    count = ids.numel() // seq_len
    if count == 0:
        raise DataError(f"held-out text has {ids.numel()} tokens, fewer than one window of seq_len {seq_len}")
    windows = ids[: count * seq_len].view(count, seq_len)  # (windows, seq_len)
    total = 0.0
    with torch.inference_mode():
        for start in range(0, count, batch_size):
            batch = windows[start : start + batch_size]  # (batch, seq_len)
            logits = model(input_ids=batch).logits[:, :-1].float()  # (batch, seq_len - 1, vocab)
            total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
    nll = total / (count * (seq_len - 1))
    return math.exp(nll) if nll < 709.0 else math.inf


def sections(methods: Sequence[str], calibration: CalibrationDataSpec) -> list[tuple[str, str, MethodSection]]:
    """``(method, scheme, recipe section)`` of every quantized row, in table order."""
    calib = {"samples": calibration.samples, "seq_len": calibration.seq_len, "seed": calibration.seed}
    rows: list[tuple[str, str, MethodSection]] = []
    for method in METHODS:
        if method not in methods:
            continue
        if method in ("rtn", "gptq", "awq"):
            for scheme, weights in _INT4_SCHEMES:
                cls = REGISTRY[method].section
                reads = {"calibration": calib} if "calibration" in cls.model_fields else {}
                section = cls(weights=WeightsSection(**weights), **reads)
                rows.append((method, scheme, section))
        elif method == "w8a8":
            section = REGISTRY["w8a8"].section(calibration=calib)
            rows.append((method, "int8 w, int8 dynamic per-token a, smoothquant 0.5", section))
        else:
            rows.append((method, "nf4 block 64", REGISTRY["bnb-nf4"].section()))
    return rows


def _weight_bytes(report) -> int:
    return sum(m.bytes_after for m in report.modules) + report.other_bytes


def measure(
    checkpoint: Path, ids: torch.Tensor, calibration: torch.Tensor, methods: Sequence[str], spec: CalibrationDataSpec,
    seq_len: int,
) -> list[Row]:
    """Score the fp model, then every quantized row on a fresh load of the checkpoint.

    Args:
        checkpoint: Checkpoint directory.
        ids: Held-out token ids.  # (tokens,)
        calibration: Calibration windows.  # (samples, seq_len)
        methods: Subset of :data:`METHODS`.
        spec: The calibration settings (for the calibrated configs).
        seq_len: Perplexity window.

    Returns:
        The rows, fp first.
    """
    fp = load_checkpoint(checkpoint).model
    base = window_perplexity(fp, ids, seq_len)
    rows = [Row("fp", str(next(fp.parameters()).dtype).removeprefix("torch."), base, 0.0, tensor_bytes(fp), 0.0)]
    del fp
    for method, scheme, section in sections(methods, spec):
        model = load_checkpoint(checkpoint).model
        config = section.config()
        start = time.perf_counter()
        report = quantize_(model, config, calibration=calibration if method in _CALIBRATED else None, progress=False)
        seconds = time.perf_counter() - start
        ppl = window_perplexity(model, ids, seq_len)
        rows.append(Row(method, scheme, ppl, 100.0 * (ppl / base - 1.0), _weight_bytes(report), seconds))
        print(f"  {method} {scheme}: ppl {ppl:.4f} ({seconds:.1f} s)", file=sys.stderr, flush=True)
        del model
    return rows


def table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| method | scheme | perplexity | increase vs fp % | weight bytes | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.scheme} | {r.ppl:.4f} | {r.increase_pct:+.2f} | {r.weight_bytes} | {r.seconds:.1f} |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="local HF checkpoint directory")
    parser.add_argument("text", type=Path, help="held-out text file (.txt, .jsonl/.json or .parquet with 'text')")
    parser.add_argument("--calibration", type=Path, default=None, help="calibration text (default: bundled)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run")
    parser.add_argument("--samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration and perplexity window")
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N held-out tokens")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and settings here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print the table.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0, or 2 when the checkpoint, a text file or a setting is invalid (one line on stderr).
    """
    args = _parser().parse_args(argv)
    transformers.logging.disable_progress_bar()
    try:
        if args.seq_len < 2 or args.samples < 1 or (args.max_tokens is not None and args.max_tokens < args.seq_len):
            raise DataError(
                f"need --seq-len >= 2, --samples >= 1 and --max-tokens >= --seq-len; got {args.seq_len}, "
                f"{args.samples}, {args.max_tokens}"
            )
        loaded = load_checkpoint(args.checkpoint)
        ids = heldout_ids(loaded.tokenizer, load_text(args.text), args.max_tokens)
        spec = CalibrationDataSpec(
            path=None if args.calibration is None else str(args.calibration), samples=args.samples, seq_len=args.seq_len
        )
        needs_calibration = any(m in _CALIBRATED for m in args.methods)
        calibration = load_calibration(spec, loaded.tokenizer) if needs_calibration else None
        del loaded
        rows = measure(args.checkpoint, ids, calibration, args.methods, spec, args.seq_len)
    except DsqInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    windows = ids.numel() // args.seq_len
    print(f"held-out: {args.text}, {ids.numel()} tokens, {windows} windows of {args.seq_len} "
          f"({windows * (args.seq_len - 1)} scored tokens)")
    if calibration is not None:
        print(f"calibration: {args.calibration or 'bundled calibration.txt'}, {args.samples} x {args.seq_len} tokens")
    print(table(rows))
    if args.json is not None:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"settings": settings, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
