"""Train the bundled tiny DeepSeek-V3 checkpoint from scratch on CPU.

The corpus is the CPython standard library of the running interpreter (``*.py``
sources plus the ``.txt``/``.rst`` documents that ship in the tree), split by
file into a training part and a held-out part with a hash of the relative path.
The script

1. builds the corpus and the split, and writes the frozen evaluation data
   (``data/heldout.txt``, ``data/mc.jsonl``) and ``data/calibration.txt``;
2. trains a 2048-token byte-level BPE tokenizer on the training split;
3. trains a ~4.8M-parameter ``DeepseekV3ForCausalLM`` (MLA attention, 1 dense
   layer + 3 MoE layers with 8 routed experts, top-2, 1 shared expert) with
   aux-loss-free load balancing (``e_score_correction_bias`` updates);
4. evaluates held-out perplexity (sliding window) and multiple-choice accuracy,
   saves model + tokenizer with ``save_pretrained`` and writes ``TRAINING.md``.

Usage::

    python -m dsq.tools.train_tiny [--minutes 15] [--out DIR]

``--out`` is the assets root: the model goes to ``DIR/tiny_deepseek_v3`` and the
data files to ``DIR/data`` (default: the directory of this file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# OpenMP workers that spin while waiting make 2 threads on a 2-core machine several times slower
# than 1 thread as soon as another process is busy; sleeping workers degrade gracefully.
# (Only effective when torch is first imported here, as with `python -m dsq.tools.train_tiny`.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dsq.tools.tiny_corpus import (  # noqa: E402
    SEED, Corpus, build_calibration_text, build_heldout_text, build_mc_items, collect_corpus, is_heldout, split_heldout,
    write_data_license,
)
from dsq.tools.tiny_model import (  # noqa: E402
    PPL_CONTEXT, PPL_STRIDE, VOCAB_SIZE, ExpertLoadTracker, check_linear_widths, encode, heldout_perplexity, make_config,
    mc_accuracy, train_tokenizer,
)
from dsq.assets import ASSETS

SEQ_LEN = 256
BIAS_UPDATE_GAMMA = 1e-3


@dataclass(frozen=True)
class FrozenData:
    """The evaluation and calibration data written to ``data/``, and the held-out files they come from."""

    ppl_files: list[tuple[str, str]]  # (relpath, text) concatenated into heldout.txt
    mc_files: list[tuple[str, str]]  # (relpath, text) the MC items are built from
    heldout_text: str
    calib_text: str
    mc_items: list[dict]


@dataclass(frozen=True)
class TrainLog:
    """What the training loop did."""

    steps: int
    tokens_seen: int
    seconds: float  # the training loop only
    batch_size: int  # sequences per step after the throughput probe
    final_loss: float  # mean of the last 20 steps
    # (step, tokens, seconds, loss, lr), about every 10% of the budget
    milestones: list[tuple[int, int, float, float, float]]


@dataclass(frozen=True)
class Evaluation:
    """The trained model on the frozen data, and its expert loads."""

    ppl: dict  # heldout_perplexity
    mc: dict  # mc_accuracy of the trained model
    init_mc: dict  # mc_accuracy of the untrained model (same init)
    train_loads: dict[str, list[float]]  # per MoE layer, over the last 10% of training
    heldout_loads: dict[str, list[float]]  # per MoE layer, on heldout.txt


# --------------------------------------------------------------------------- training


def make_windows(corpus_ids: list[list[int]], bos: int, eos: int) -> torch.Tensor:
    """Documents (in a seeded shuffled order) -> one stream `<bos> doc <eos> <bos> doc <eos> ...`
    -> non-overlapping SEQ_LEN windows, shuffled with the same seed."""
    g = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(corpus_ids), generator=g).tolist()
    stream: list[int] = []
    for i in order:
        stream.append(bos)
        stream.extend(corpus_ids[i])
        stream.append(eos)
    n = len(stream) // SEQ_LEN
    windows = torch.tensor(stream[: n * SEQ_LEN], dtype=torch.long).view(n, SEQ_LEN)
    return windows[torch.randperm(n, generator=g)]


def param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed_tokens" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, progress: float, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    warm = min(1.0, (step + 1) / warmup)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return peak * warm * (min_ratio + (1.0 - min_ratio) * cos)


def choose_batch_size(tokens_per_s: float, seconds: float, target_steps: int = 800) -> int:
    """Pick a batch (multiple of 8, 16..32 sequences) that gives ~target_steps optimizer steps."""
    b = tokens_per_s * seconds / (target_steps * SEQ_LEN)
    return int(min(32, max(16, 8 * round(b / 8))))


def _optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, tracker: ExpertLoadTracker, batch: torch.Tensor,
                    lr: float) -> float:
    """One AdamW step on ``batch`` ``(B, SEQ_LEN)`` (clipped to norm 1.0), then the router bias update."""
    for group in opt.param_groups:
        group["lr"] = lr
    out = model(input_ids=batch, labels=batch)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    tracker.update_bias(BIAS_UPDATE_GAMMA)
    return float(out.loss.detach())


def train_model(
    model: nn.Module, windows: torch.Tensor, tracker: ExpertLoadTracker, args: argparse.Namespace
) -> TrainLog:
    """Train until the time or token budget of ``args`` is spent.

    The batch size, unless given, is chosen from the throughput of steps 3..10 at batch 16; the
    tracker's loads are reset at 90% of the budget, so they cover the last 10% of training.
    """
    tracker.reset_total()
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    budget_s = args.minutes * 60.0
    batch_size = args.batch_size or 16
    probe_steps = 8
    step = tokens_seen = cursor = 0
    losses: list[float] = []
    milestones: list[tuple[int, int, float, float, float]] = []
    train_time = 0.0
    probe_t0 = probe_tok0 = None
    tail_reset_done = False
    pbar = tqdm(total=100, desc="train", unit="%", mininterval=15, file=sys.stdout, bar_format="{l_bar}{bar:20}{r_bar}")
    model.train()
    progress = 0.0
    while progress < 1.0:
        t_step = time.time()
        if cursor + batch_size > len(windows):
            cursor = 0
        batch = windows[cursor : cursor + batch_size]
        cursor += batch_size
        lr = lr_at(step, progress, args.lr, args.warmup_steps)
        loss = _optimizer_step(model, opt, tracker, batch, lr)
        assert math.isfinite(loss), f"loss diverged at step {step}"
        losses.append(loss)
        step += 1
        tokens_seen += batch.numel()
        train_time += time.time() - t_step
        progress = max(train_time / budget_s, tokens_seen / args.max_tokens)
        if step == 2:
            probe_t0, probe_tok0 = train_time, tokens_seen
        if step == 2 + probe_steps and not args.batch_size:
            tps = (tokens_seen - probe_tok0) / (train_time - probe_t0)
            batch_size = choose_batch_size(tps, budget_s)
            print(f"\nthroughput {tps:,.0f} tokens/s at batch 16 -> batch size {batch_size}", flush=True)
        if progress >= 0.9 and not tail_reset_done:
            tracker.reset_total()  # report loads over the last 10% of training
            tail_reset_done = True
        if int(progress * 10) > len(milestones) - 1 or progress >= 1.0:
            milestones.append((step, tokens_seen, train_time, sum(losses[-20:]) / len(losses[-20:]), lr))
        pbar.set_postfix_str(f"step {step} loss {sum(losses[-20:]) / len(losses[-20:]):.3f} lr {lr:.2e} tok {tokens_seen:,}", refresh=False)
        pbar.update(min(100, int(progress * 100)) - pbar.n)
    pbar.close()
    final_loss = sum(losses[-20:]) / len(losses[-20:])
    return TrainLog(step, tokens_seen, train_time, batch_size, final_loss, milestones)


# --------------------------------------------------------------------------- main steps


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget of the training loop")
    parser.add_argument("--max-tokens", type=int, default=50_000_000, help="token budget of the training loop")
    parser.add_argument("--out", type=Path, default=ASSETS, help="assets root (default: the package's dsq/assets)")
    parser.add_argument("--batch-size", type=int, default=0, help="sequences per step (0: chosen from throughput)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=40)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def _write_frozen_data(corpus: Corpus, data_dir: Path) -> FrozenData:
    """Build ``heldout.txt``, ``calibration.txt`` and ``mc.jsonl`` from ``corpus`` and write them."""
    ppl_files, mc_files = split_heldout(corpus)
    heldout_text = build_heldout_text(ppl_files)
    calib_text = build_calibration_text(corpus)
    mc_items = build_mc_items(mc_files)
    (data_dir / "heldout.txt").write_text(heldout_text, encoding="utf-8")
    (data_dir / "calibration.txt").write_text(calib_text, encoding="utf-8")
    with open(data_dir / "mc.jsonl", "w", encoding="utf-8") as f:
        for item in mc_items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    train_chars = sum(len(t) for _, t in corpus.train)
    print(
        f"corpus: {len(corpus.train)} train files ({train_chars / 1e6:.2f}M chars), "
        f"{len(corpus.heldout)} held-out files ({len(ppl_files)} -> heldout.txt, {len(mc_files)} -> mc.jsonl), "
        f"{len(mc_items)} MC items, skipped (not UTF-8): {corpus.skipped}",
        flush=True,
    )
    return FrozenData(ppl_files, mc_files, heldout_text, calib_text, mc_items)


def _tokenize(corpus: Corpus, data: FrozenData) -> tuple[object, list[list[int]]]:
    """Train the tokenizer on the training files; returns it and the training files' token ids."""
    t0 = time.time()
    tokenizer = train_tokenizer([t for _, t in corpus.train])
    for _, t in data.ppl_files[:3] + data.mc_files[:3]:
        assert tokenizer.decode(encode(tokenizer, t)) == t, "byte-level round trip failed"
    train_ids = tokenizer([t for _, t in corpus.train], add_special_tokens=False)["input_ids"]
    train_tokens = sum(len(x) for x in train_ids)
    train_chars = sum(len(t) for _, t in corpus.train)
    print(
        f"tokenizer: vocab {len(tokenizer)}, {train_tokens:,} training tokens "
        f"({train_chars / train_tokens:.2f} chars/token), {time.time() - t0:.1f}s",
        flush=True,
    )
    return tokenizer, train_ids


def evaluate_trained(model: nn.Module, tokenizer, tracker: ExpertLoadTracker, data: FrozenData, init_mc: dict) -> Evaluation:
    """Held-out perplexity and MC accuracy of the trained model; detaches the tracker.

    ``data``: anything with ``heldout_text`` and ``mc_items`` (:class:`FrozenData`, ``train_llama.EvalData``).
    """
    train_loads = tracker.fractions()
    model.eval()
    tracker.reset_total()
    ppl = heldout_perplexity(model, tokenizer, data.heldout_text)
    heldout_loads = tracker.fractions()
    tracker.remove()
    mc = mc_accuracy(model, tokenizer, data.mc_items)
    print(f"held-out ppl {ppl['ppl']:.3f} ({ppl['tokens']} tokens, {ppl['seconds']:.1f}s); MC acc {mc['acc']:.3f} acc_norm {mc['acc_norm']:.3f}", flush=True)
    return Evaluation(ppl, mc, init_mc, train_loads, heldout_loads)


def save_and_verify(model: nn.Module, tokenizer, model_dir: Path, heldout_text: str) -> dict[str, list[int]]:
    """Save model and tokenizer, reload both and check they compute the same.

    Returns:
        The shapes of the per-expert tensors in ``model.safetensors``, by name.
    """
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for p in model_dir.iterdir():
        if p.is_file() and p.name != "TRAINING.md":
            p.unlink()
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok2 = AutoTokenizer.from_pretrained(model_dir)
    probe = encode(tokenizer, heldout_text[:2000])[:200]
    assert encode(tok2, heldout_text[:2000])[:200] == probe, "reloaded tokenizer differs"
    assert tok2.decode(encode(tok2, heldout_text)) == heldout_text, "reloaded tokenizer does not round-trip"
    with torch.no_grad():
        x = torch.tensor([probe])
        same = torch.equal(model(input_ids=x).logits, reloaded(input_ids=x).logits)
    assert same, "reloaded model logits differ"
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        expert_keys = {k: f.get_slice(k).get_shape() for k in f.keys() if ".mlp.experts." in k}
    return expert_keys


# --------------------------------------------------------------------------- model card


def fmt_size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def _card_architecture(n_params: int, config, tokenizer, expert_keys: dict[str, list[int]]) -> str:
    layout = sorted(k for k in expert_keys if k.startswith("model.layers.1."))
    return f"""# tiny_deepseek_v3

A {n_params / 1e6:.2f}M-parameter `DeepseekV3ForCausalLM` trained from scratch on CPU on the
CPython {platform.python_version()} standard library. It is a test fixture for the compression
toolkit (quantization, evaluation gates), not a useful language model.

## Architecture

| | |
|---|---|
| layers | 4 (layer 0 dense MLP, layers 1-3 MoE) |
| hidden size | 256 |
| attention | MLA, 4 heads, q_lora_rank 128, kv_lora_rank 64, qk_nope 32 + qk_rope 32, v_head_dim 64, interleaved RoPE |
| dense MLP | intermediate 512 (SwiGLU) |
| MoE | 8 routed experts (top-2, sigmoid router, n_group 1, normalised top-k, routed_scaling_factor {config.routed_scaling_factor}) + 1 shared expert, expert intermediate 128 |
| vocab | {VOCAB_SIZE} (byte-level BPE, special tokens `<|bos|>`={tokenizer.bos_token_id}, `<|eos|>`={tokenizer.eos_token_id}, `<|pad|>`={tokenizer.pad_token_id}) |
| embeddings | untied, max_position_embeddings 1024 |
| parameters | {n_params:,} (fp32) |

Every `nn.Linear` reads at least 64 input features. In `model.safetensors` the routed experts are
stored per expert, as in the original DeepSeek-V3 checkpoints (transformers fuses them into
`mlp.experts.gate_up_proj` [E, 2I, H] / `mlp.experts.down_proj` [E, H, I] on load), e.g. for layer 1:

```
{chr(10).join(f"{k} {list(expert_keys[k])}" for k in layout[:3])}
... ({len(expert_keys)} expert tensors in total: 3 layers x 8 experts x 3)
```

"""


def _card_corpus(corpus: Corpus, train_chars: int, train_tokens: int) -> str:
    return f"""## Corpus and split

`*.py`, `*.txt` and `*.rst` files of the CPython {platform.python_version()} standard library
(see `../data/LICENSE-DATA.md`), {len(corpus.train)} training files ({train_chars / 1e6:.2f}M characters,
{train_tokens:,} tokens, {train_chars / train_tokens:.2f} characters/token) and {len(corpus.heldout)} held-out files,
split by a hash of the relative path.

"""


def _card_training(args: argparse.Namespace, log: TrainLog, train_tokens: int, wall: float) -> str:
    step, tokens_seen, train_time, batch_size = log.steps, log.tokens_seen, log.seconds, log.batch_size
    final_loss, milestones = log.final_loss, log.milestones
    return f"""## Training

- `python -m dsq.tools.train_tiny --minutes {args.minutes:g}` ({platform.python_implementation()} {platform.python_version()},
  torch {torch.__version__}, {args.threads} CPU threads)
- documents joined as `<|bos|> text <|eos|>`, cut into {SEQ_LEN}-token windows, shuffled with seed {SEED}
- AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak lr {args.lr:g}, {args.warmup_steps} warmup steps,
  cosine decay to 10% over the time/token budget, grad clip 1.0, fp32, batch {batch_size} x {SEQ_LEN}
- aux-loss-free load balancing: after each step, `e_score_correction_bias += {BIAS_UPDATE_GAMMA:g} * sign(mean_load - load)` per MoE layer
- {step} steps, **{tokens_seen:,} tokens seen** ({tokens_seen / train_tokens:.2f} epochs), training loop {train_time / 60:.1f} min,
  total wall time {wall / 60:.1f} min (corpus, tokenizer, training, evaluation, saving)
- **final train loss {final_loss:.3f}** (mean of the last 20 steps)

Loss curve (mean of the previous 20 steps):

| step | tokens | minutes | train loss | lr |
|---|---|---|---|---|
{chr(10).join(f"| {st} | {tk:,} | {tm / 60:.1f} | {ls:.3f} | {lr_:.2e} |" for st, tk, tm, ls, lr_ in milestones)}

"""


def card_evaluation(ev: Evaluation, n_tok_heldout: int) -> str:
    ppl, mc, init_mc = ev.ppl, ev.mc, ev.init_mc
    return f"""## Evaluation

- **held-out perplexity {ppl['ppl']:.2f}** on `data/heldout.txt` ({n_tok_heldout:,} tokens; sliding window, context {PPL_CONTEXT},
  stride {PPL_STRIDE}, no BOS; {ppl['bits_per_byte']:.3f} bits/byte)
- **multiple choice `data/mc.jsonl`** ({mc['n']} items, 4 choices, next-line prediction): acc **{mc['acc']:.3f}**,
  acc_norm {mc['acc_norm']:.3f} (untrained model with the same init: acc {init_mc['acc']:.3f}, acc_norm {init_mc['acc_norm']:.3f}; chance 0.25)

"""


def card_expert_load(ev: Evaluation, tracker: ExpertLoadTracker) -> str:
    train_loads, heldout_loads = ev.train_loads, ev.heldout_loads
    load_rows = []
    for key in train_loads:
        load_rows.append(
            f"| {key} | " + " ".join(f"{v:.3f}" for v in train_loads[key]) + " | "
            + " ".join(f"{v:.3f}" for v in heldout_loads[key]) + " |"
        )
    biases = {
        k: [round(float(v), 3) for v in r.e_score_correction_bias] for k, r in tracker.routers.items()
    }
    return f"""## Expert load (fraction of routed token slots per expert 0..7)

| layer | last 10% of training | held-out text |
|---|---|---|
{chr(10).join(load_rows)}

Final `e_score_correction_bias`: {json.dumps(biases)}

"""


def card_files(sizes: dict[str, int]) -> str:
    return f"""## Files

{chr(10).join(f"- `{k}`: {fmt_size(v)}" for k, v in sizes.items())}
"""



@dataclass(frozen=True)
class CardFacts:
    """Counts and sizes the model card reports besides the training log and the evaluation."""

    n_params: int
    expert_keys: dict[str, list[int]]  # per-expert tensor shapes in model.safetensors, by name
    train_chars: int
    train_tokens: int
    wall: float  # seconds, from the start of main to the card
    n_tok_heldout: int  # tokens of heldout.txt
    sizes: dict[str, int]  # bytes, by file name (model files, then data/...)


def model_card(args: argparse.Namespace, corpus: Corpus, tokenizer, config, tracker: ExpertLoadTracker,
               facts: CardFacts, log: TrainLog, ev: Evaluation) -> str:
    """``TRAINING.md``: architecture, corpus, training, evaluation, expert loads and files."""
    return (
        _card_architecture(facts.n_params, config, tokenizer, facts.expert_keys)
        + _card_corpus(corpus, facts.train_chars, facts.train_tokens)
        + _card_training(args, log, facts.train_tokens, facts.wall)
        + card_evaluation(ev, facts.n_tok_heldout)
        + card_expert_load(ev, tracker)
        + card_files(facts.sizes)
    )


# --------------------------------------------------------------------------- main


def _file_sizes(model_dir: Path, data_dir: Path) -> dict[str, int]:
    sizes = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir()) if p.is_file()}
    sizes.update({f"data/{p.name}": p.stat().st_size for p in sorted(data_dir.iterdir()) if p.is_file()})
    return sizes


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    t_start = time.time()
    torch.manual_seed(SEED)
    random.seed(SEED)
    torch.set_num_threads(args.threads)
    from transformers import DeepseekV3ForCausalLM

    model_dir = args.out / "tiny_deepseek_v3"
    data_dir = args.out / "data"
    model_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)

    corpus = collect_corpus()
    data = _write_frozen_data(corpus, data_dir)
    tokenizer, train_ids = _tokenize(corpus, data)
    windows = make_windows(train_ids, tokenizer.bos_token_id, tokenizer.eos_token_id)

    torch.manual_seed(SEED)
    config = make_config(tokenizer)
    model = DeepseekV3ForCausalLM(config)
    check_linear_widths(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    init_mc = mc_accuracy(model, tokenizer, data.mc_items)
    print(f"untrained MC: acc {init_mc['acc']:.3f} acc_norm {init_mc['acc_norm']:.3f}", flush=True)

    tracker = ExpertLoadTracker(model)
    log = train_model(model, windows, tracker, args)
    train_tokens = sum(len(x) for x in train_ids)
    print(
        f"trained {log.steps} steps, {log.tokens_seen:,} tokens ({log.tokens_seen / train_tokens:.2f} epochs), "
        f"{log.seconds:.0f}s, final train loss (mean of last 20 steps) {log.final_loss:.4f}",
        flush=True,
    )
    ev = evaluate_trained(model, tokenizer, tracker, data, init_mc)
    expert_keys = save_and_verify(model, tokenizer, model_dir, data.heldout_text)

    facts = CardFacts(
        n_params=n_params, expert_keys=expert_keys, train_chars=sum(len(t) for _, t in corpus.train),
        train_tokens=train_tokens, wall=time.time() - t_start, n_tok_heldout=len(encode(tokenizer, data.heldout_text)),
        sizes=_file_sizes(model_dir, data_dir),
    )
    card = model_card(args, corpus, tokenizer, config, tracker, facts, log, ev)
    (model_dir / "TRAINING.md").write_text(card, encoding="utf-8")
    write_data_license(
        data_dir, corpus, data.ppl_files, data.mc_files, data.mc_items, data.calib_text, data.heldout_text
    )
    print(card)
    return 0


__all__ = [
    "BIAS_UPDATE_GAMMA",
    "SEQ_LEN",
    "CardFacts",
    "Evaluation",
    "FrozenData",
    "TrainLog",
    "choose_batch_size",
    "collect_corpus",
    "is_heldout",
    "lr_at",
    "main",
    "make_windows",
    "model_card",
    "param_groups",
    "train_model",
]


if __name__ == "__main__":
    raise SystemExit(main())
