"""Train a dense ~12M-parameter ``LlamaForCausalLM`` from scratch on CPU, to benchmark weight quantization on.

The model reads the same text as the bundled tiny DeepSeek-V3 (:mod:`dsq.tools.train_tiny`): the
training split of the CPython standard library (:func:`dsq.tools.tiny_corpus.collect_corpus`), cut
into the same shuffled 256-token windows, with the bundled model's 2048-token tokenizer, so the
bundled ``data/heldout.txt``, ``data/mc.jsonl`` and ``data/calibration.txt`` apply unchanged. The
script trains with AdamW, warmup and cosine decay over a time/token budget (the loop of
:func:`dsq.tools.train_tiny.train_model`), scores held-out perplexity (sliding window) and
multiple-choice accuracy in fp32, and saves model + tokenizer with ``save_pretrained`` (fp32
safetensors) and a ``TRAINING.md`` card.

Architecture (``--shape 12m``, the default): hidden 384, 6 layers, 6 heads of 64 (6 KV heads),
SwiGLU MLP of width 1000, RoPE, RMSNorm, untied embeddings. 1000 is a multiple of neither 32 nor
128, so ``down_proj`` has a ragged last quantization group along its input features, as in many
released checkpoints. ``--shape 1m`` is the same design at hidden 128, 4 layers, 4 heads of 32 and
MLP width 344 (ragged at 32 and 128 too): small enough to see many tokens per parameter on a CPU,
the regime in which released small checkpoints are trained and in which weight quantization costs
the most (Kumar et al., "Scaling Laws for Precision", 2024).

Usage::

    python -m dsq.tools.train_llama [--shape 12m|1m] [--minutes 25] [--out DIR] [--threads 2]

``--out`` is the model directory (default ``runs/models/tiny_llama``). It is written atomically;
an earlier output of this script there (it holds ``TRAINING.md``) is replaced, anything else is
left alone and the run stops (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Sleeping OpenMP workers degrade gracefully on a busy 2-core machine (see dsq.tools.train_tiny).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

from dsq.assets import ASSETS, data_file, tiny_model_dir
from dsq.core.atomic import OutputExistsError, atomic_directory, claim_output
from dsq.core.errors import DsqInputError
from dsq.tools.tiny_corpus import SEED, collect_corpus
from dsq.tools.tiny_model import (
    PPL_CONTEXT,
    PPL_STRIDE,
    VOCAB_SIZE,
    ExpertLoadTracker,
    heldout_perplexity,
    mc_accuracy,
)
from dsq.tools.train_tiny import (
    SEQ_LEN,
    TrainLog,
    fmt_size,
    save_and_verify,
    make_windows,
    train_model,
)

DEFAULT_OUT = Path("runs/models/tiny_llama")
MARKER = "TRAINING.md"  # the file that marks a directory as this script's output


class AutocastForward(nn.Module):
    """``module``'s forward pass under CPU autocast to ``dtype``, for training.

    Only the forward pass (and the loss in it) runs under autocast; backward follows the recorded
    dtypes, and gradient clipping and the AdamW step stay outside (run under autocast as well, they
    stall training).
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, **kwargs):
        with torch.autocast("cpu", dtype=self.dtype):
            return self.module(**kwargs)


# Training precision: fp32 master weights and optimizer state either way; "bf16-autocast" runs the
# matrix products of the forward and backward passes in bfloat16 (about 2.4x the tokens/s of fp32
# on a CPU with AVX512-BF16). Evaluation always runs in fp32 on the unwrapped model.
PRECISIONS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "bf16-autocast": lambda model: AutocastForward(model, torch.bfloat16),
    "fp32": lambda model: model,
}


@dataclass(frozen=True)
class EvalData:
    """The bundled evaluation data, optionally cut short."""

    heldout_text: str  # data/heldout.txt, or its first --heldout-chars characters
    mc_items: list[dict]  # data/mc.jsonl, or its first --mc-items items


@dataclass(frozen=True)
class TrainData:
    """The training split as token windows."""

    windows: torch.Tensor  # (n_windows, SEQ_LEN) token ids
    n_files: int
    n_chars: int
    n_tokens: int


@dataclass(frozen=True)
class Result:
    """What the card reports besides the configuration."""

    n_params: int
    data: TrainData
    log: TrainLog
    ppl: dict  # heldout_perplexity
    mc: dict  # mc_accuracy
    wall: float  # seconds, from the start of main to the card
    sizes: dict[str, int]  # bytes, by file name


# --------------------------------------------------------------------------- model and data


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a benchmark Llama (every head is also a KV head)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int  # a multiple of neither 32 nor 128: down_proj gets a ragged last group

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES: dict[str, LlamaShape] = {
    "12m": LlamaShape(hidden=384, layers=6, heads=6, intermediate=1000),  # 12.0M parameters
    "1m": LlamaShape(hidden=128, layers=4, heads=4, intermediate=344),  # 1.32M parameters (0.79M outside embeddings)
}


def make_llama_config(tokenizer, shape: LlamaShape = SHAPES["12m"]):
    """The ``LlamaConfig`` of the benchmark model (vocabulary and special tokens from ``tokenizer``).

    Args:
        tokenizer: the bundled tiny model's tokenizer.
        shape: its sizes.

    Returns:
        A ``LlamaConfig`` (~12.0M parameters at the default shape).
    """
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        head_dim=shape.head_dim,
        intermediate_size=shape.intermediate,
        hidden_act="silu",
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def load_train_data(tokenizer) -> TrainData:
    """Tokenize the training split of the corpus into the shuffled ``SEQ_LEN`` windows of train_tiny.

    Args:
        tokenizer: the bundled tiny model's tokenizer.

    Returns:
        The windows and the size of the training split.
    """
    t0 = time.time()
    corpus = collect_corpus()
    texts = [t for _, t in corpus.train]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    windows = make_windows(ids, tokenizer.bos_token_id, tokenizer.eos_token_id)
    data = TrainData(windows, len(texts), sum(len(t) for t in texts), sum(len(x) for x in ids))
    print(f"corpus: {data.n_files} training files, {data.n_chars / 1e6:.2f}M chars, {data.n_tokens:,} tokens, "
          f"{len(windows):,} windows of {SEQ_LEN}, {time.time() - t0:.1f}s", flush=True)
    return data


def load_eval_data(heldout_chars: int, mc_items: int) -> EvalData:
    """The bundled ``heldout.txt`` and ``mc.jsonl``.

    Args:
        heldout_chars: keep only this many characters of ``heldout.txt`` (0: all).
        mc_items: keep only this many items of ``mc.jsonl`` (0: all).

    Returns:
        The evaluation text and items.
    """
    text = data_file("heldout.txt").read_text(encoding="utf-8")
    with open(data_file("mc.jsonl"), encoding="utf-8") as f:
        items = [json.loads(line) for line in f if line.strip()]
    return EvalData(text[:heldout_chars] if heldout_chars else text, items[:mc_items] if mc_items else items)


def train(model: nn.Module, data: TrainData, args: argparse.Namespace) -> TrainLog:
    """Run train_tiny's loop (AdamW, warmup + cosine, grad clip 1.0) in the precision of ``args``.

    Args:
        model: the model to train in place.
        data: the training windows.
        args: the budget, optimizer settings and precision (the command line).

    Returns:
        What the loop did (steps, tokens, loss curve).
    """
    # A dense model has no routers: the tracker watches nothing and its bias update does nothing.
    tracker = ExpertLoadTracker(model)
    log = train_model(PRECISIONS[args.precision](model), data.windows, tracker, args)
    tracker.remove()
    print(f"trained {log.steps} steps, {log.tokens_seen:,} tokens ({log.tokens_seen / data.n_tokens:.2f} epochs), "
          f"{log.seconds:.0f}s, final train loss (mean of last 20 steps) {log.final_loss:.4f}", flush=True)
    return log


def evaluate(model: nn.Module, tokenizer, data: EvalData) -> tuple[dict, dict]:
    """Held-out perplexity (train_tiny's sliding-window scorer) and MC accuracy, in fp32.

    Args:
        model: the trained model.
        tokenizer: its tokenizer.
        data: the evaluation text and items.

    Returns:
        ``heldout_perplexity`` and ``mc_accuracy`` results.
    """
    model.eval()
    ppl = heldout_perplexity(model, tokenizer, data.heldout_text)
    mc = mc_accuracy(model, tokenizer, data.mc_items)
    print(f"held-out ppl {ppl['ppl']:.3f} ({ppl['tokens']} tokens, {ppl['seconds']:.1f}s); "
          f"MC acc {mc['acc']:.3f} acc_norm {mc['acc_norm']:.3f} ({mc['n']} items)", flush=True)
    return ppl, mc


# --------------------------------------------------------------------------- model card


def _ragged_note(width: int) -> str:
    if width % 32:  # then not a multiple of 128 either
        return " (a multiple of neither 32 nor 128: `down_proj` has a ragged last quantization group)"
    return ""


def _card_architecture(config, n_params: int) -> str:
    return f"""# tiny_llama

A {n_params / 1e6:.2f}M-parameter `LlamaForCausalLM` trained from scratch on CPU on the training split of
the CPython {platform.python_version()} standard library, with the tokenizer of the bundled
`tiny_deepseek_v3`. A dense model to benchmark weight quantization on, not a useful language model.

| | |
|---|---|
| layers | {config.num_hidden_layers} |
| hidden size | {config.hidden_size} |
| attention | {config.num_attention_heads} heads x head_dim {config.head_dim}, {config.num_key_value_heads} KV heads, RoPE (theta {config.rope_parameters['rope_theta']:g}) |
| MLP | SwiGLU, intermediate {config.intermediate_size}{_ragged_note(config.intermediate_size)} |
| norm | RMSNorm, eps {config.rms_norm_eps:g} |
| vocab | {config.vocab_size} (the bundled byte-level BPE) |
| embeddings | untied, max_position_embeddings {config.max_position_embeddings} |
| parameters | {n_params:,} (fp32) |

"""


def card_training(args: argparse.Namespace, command: str, res: Result) -> str:
    log, data = res.log, res.data
    return f"""## Training

- `{command}` ({platform.python_implementation()} {platform.python_version()}, torch {torch.__version__},
  {args.threads} CPU threads)
- corpus: {data.n_files} training files of `dsq.tools.tiny_corpus` ({data.n_chars / 1e6:.2f}M characters,
  {data.n_tokens:,} tokens), joined as `<|bos|> text <|eos|>`, cut into {SEQ_LEN}-token windows, shuffled with seed {SEED}
- AdamW (betas 0.9/0.95, weight decay {args.weight_decay:g} on matrices), peak lr {args.lr:g}, {args.warmup_steps} warmup steps,
  cosine decay to 10% over the time/token budget, grad clip 1.0, {args.precision}, batch {log.batch_size} x {SEQ_LEN}
- {log.steps} steps, **{log.tokens_seen:,} tokens seen** ({log.tokens_seen / data.n_tokens:.2f} epochs),
  training loop {log.seconds / 60:.1f} min, total wall time {res.wall / 60:.1f} min
- **final train loss {log.final_loss:.3f}** (mean of the last 20 steps)

| step | tokens | minutes | train loss | lr |
|---|---|---|---|---|
{chr(10).join(f"| {st} | {tk:,} | {tm / 60:.1f} | {ls:.3f} | {lr:.2e} |" for st, tk, tm, ls, lr in log.milestones)}

"""


def _card_evaluation(res: Result) -> str:
    ppl, mc = res.ppl, res.mc
    return f"""## Evaluation (fp32)

- **held-out perplexity {ppl['ppl']:.2f}** on the bundled `data/heldout.txt` ({ppl['tokens']:,} scored tokens;
  sliding window, context {PPL_CONTEXT}, stride {PPL_STRIDE}, no BOS; {ppl['bits_per_byte']:.3f} bits/byte)
- **multiple choice** on the bundled `data/mc.jsonl` ({mc['n']} items, 4 choices, next-line prediction):
  acc **{mc['acc']:.3f}**, acc_norm {mc['acc_norm']:.3f} (chance 0.25)

## Files

{chr(10).join(f"- `{name}`: {fmt_size(size)}" for name, size in res.sizes.items())}
"""


def model_card(args: argparse.Namespace, command: str, config, res: Result) -> str:
    """``TRAINING.md``: architecture, training, evaluation and files.

    Args:
        args: the command line, parsed.
        command: the command line as typed.
        config: the model's ``LlamaConfig``.
        res: what the run measured.

    Returns:
        The card's Markdown text.
    """
    return _card_architecture(config, res.n_params) + card_training(args, command, res) + _card_evaluation(res)


# --------------------------------------------------------------------------- main


def trainer_parser(description: str, *, minutes: float, out: Path, out_help: str, lr: float) -> argparse.ArgumentParser:
    """The command line of a tiny-model trainer (this one and :mod:`dsq.tools.train_tiny_v4`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--minutes", type=float, default=minutes, help="wall-clock budget of the training loop")
    parser.add_argument("--max-tokens", type=int, default=50_000_000, help="token budget of the training loop")
    parser.add_argument("--out", type=Path, default=out, help=out_help)
    parser.add_argument("--batch-size", type=int, default=0, help="sequences per step (0: chosen from throughput)")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--warmup-steps", type=int, default=40)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16-autocast",
                        help="training precision (evaluation is fp32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heldout-chars", type=int, default=0, help="score only this many held-out characters (0: all)")
    parser.add_argument("--mc-items", type=int, default=0, help="score only this many MC items (0: all)")
    return parser


def parse_trainer_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed by ``parser`` (:func:`trainer_parser`), budgets and counts checked."""
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.max_tokens <= 0 or args.threads < 1:
        parser.error("--minutes, --max-tokens and --threads must be positive")
    if min(args.batch_size, args.heldout_chars, args.mc_items) < 0:
        parser.error("--batch-size, --heldout-chars and --mc-items must be >= 0")
    return args


def _check_out(out: Path) -> None:
    """The bundled assets are never an output."""
    if out.resolve().is_relative_to(ASSETS):
        raise OutputExistsError(f"output {out} is inside the bundled assets {ASSETS}; choose another --out")


def _run(args: argparse.Namespace, command: str, t_start: float) -> str:
    """Train, evaluate and save into ``args.out``; returns the model card."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir()))
    train_data = load_train_data(tokenizer)
    eval_data = load_eval_data(args.heldout_chars, args.mc_items)
    torch.manual_seed(SEED)
    config = make_llama_config(tokenizer, SHAPES[args.shape])
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    log = train(model, train_data, args)
    ppl, mc = evaluate(model, tokenizer, eval_data)
    with atomic_directory(args.out, overwrite=True, marker=MARKER) as tmp:
        save_and_verify(model, tokenizer, tmp, eval_data.heldout_text)
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        res = Result(n_params, train_data, log, ppl, mc, time.time() - t_start, sizes)
        card = model_card(args, command, config, res)
        (tmp / MARKER).write_text(card, encoding="utf-8")
    return card


Run = Callable[[argparse.Namespace, str, float], str]
"""``run(args, command, t_start)``: train, evaluate and save into ``args.out``; returns the model card."""


def run_trainer(argv: list[str] | None, module: str, parser: argparse.ArgumentParser, run: Run,
                check_out: Callable[[Path], None] | None = None) -> int:
    """Parse ``argv``, seed, claim ``--out`` and ``run`` the trainer ``module`` (``dsq.tools.NAME``); print the card.

    Returns:
        0, or 2 when ``--out`` may not be written (one line on stderr).
    """
    argv = sys.argv[1:] if argv is None else argv
    args = parse_trainer_args(parser, argv)
    t_start = time.time()
    torch.manual_seed(SEED)
    random.seed(SEED)
    torch.set_num_threads(args.threads)
    command = " ".join([f"python -m {module}", *argv])
    try:
        if check_out is not None:
            check_out(args.out)
        with claim_output(args.out, True, MARKER):  # held from before the training
            card = run(args, command, t_start)
    except DsqInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(card)
    print(f"saved to {args.out}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Train the model and write it to ``--out`` (default ``sys.argv[1:]``); 0, or 2 when ``--out`` may not be written."""
    parser = trainer_parser(__doc__.split("\n\n")[0], minutes=25.0, out=DEFAULT_OUT,
                            out_help=f"model directory (default {DEFAULT_OUT})", lr=2e-3)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="12m", help="model sizes (see the module docstring)")
    return run_trainer(argv, "dsq.tools.train_llama", parser, _run, _check_out)


if __name__ == "__main__":
    raise SystemExit(main())
