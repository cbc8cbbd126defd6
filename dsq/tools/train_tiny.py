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
import hashlib
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

# OpenMP workers that spin while waiting make 2 threads on a 2-core machine several times slower
# than 1 thread as soon as another process is busy; sleeping workers degrade gracefully.
# (Only effective when torch is first imported here, as with `python -m dsq.tools.train_tiny`.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

SEED = 1234
SEQ_LEN = 256
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>"]
HELDOUT_PERMILLE = 30  # ~3% of the files are held out
HELDOUT_TXT_MIN_CHARS = 80_000
HELDOUT_TXT_MAX_CHARS = 115_000
CALIB_TARGET_CHARS = 150_000
CALIB_CHUNK_CHARS = 3_000
MC_ITEMS = 250
MC_CONTEXT_LINES = 8
MC_MAX_PER_FILE = 25
PPL_CONTEXT = 256
PPL_STRIDE = 128
BIAS_UPDATE_GAMMA = 1e-3

EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
# Build-specific files: their content depends on how the interpreter was compiled.
EXCLUDED_PREFIXES = ("config-3.", "_sysconfigdata_")
TEXT_SUFFIXES = {".py", ".txt", ".rst"}


# --------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    root: Path
    train: list[tuple[str, str]] = field(default_factory=list)  # (relpath, text), sorted by relpath
    heldout: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # not valid UTF-8


def _path_bucket(relpath: str) -> int:
    return int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big") % 1000


def is_heldout(relpath: str) -> bool:
    return _path_bucket(relpath) < HELDOUT_PERMILLE


def _excluded(rel: Path) -> bool:
    parts = rel.parts
    if any(p in EXCLUDED_DIRS for p in parts[:-1]):
        return True
    if parts[0].startswith(EXCLUDED_PREFIXES) or rel.name.startswith(EXCLUDED_PREFIXES):
        return True
    # lib2to3/tests and idlelib/idle_test are covered by EXCLUDED_DIRS.
    return rel.suffix not in TEXT_SUFFIXES


def collect_corpus(stdlib: str | None = None) -> Corpus:
    root = Path(stdlib or sysconfig.get_paths()["stdlib"]).resolve()
    corpus = Corpus(root=root)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in filenames:
            rel = Path(dirpath, name).relative_to(root)
            if not _excluded(rel):
                files.append(rel.as_posix())
    for rel in sorted(files):
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            corpus.skipped.append(rel)
            continue
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not text.strip():
            continue
        (corpus.heldout if is_heldout(rel) else corpus.train).append((rel, text))
    return corpus


def split_heldout(corpus: Corpus) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Held-out files -> (files concatenated into heldout.txt, files used for mc.jsonl)."""
    ppl_files, mc_files, total = [], [], 0
    for rel, text in corpus.heldout:
        if total < HELDOUT_TXT_MIN_CHARS and total + len(text) <= HELDOUT_TXT_MAX_CHARS:
            ppl_files.append((rel, text))
            total += len(text)
        else:
            mc_files.append((rel, text))
    return ppl_files, mc_files


def build_heldout_text(ppl_files: list[tuple[str, str]]) -> str:
    return "\n\n".join(text.rstrip("\n") for _, text in ppl_files) + "\n"


def build_calibration_text(corpus: Corpus) -> str:
    """Line-aligned ~3 KB chunks from training files, chosen with a fixed seed."""
    rng = random.Random(SEED + 1)
    files = [f for f in corpus.train if len(f[1]) > 2 * CALIB_CHUNK_CHARS]
    rng.shuffle(files)
    chunks, total = [], 0
    for _, text in files:
        if total >= CALIB_TARGET_CHARS:
            break
        start = rng.randrange(0, len(text) - CALIB_CHUNK_CHARS)
        start = text.rfind("\n", 0, start) + 1
        end = text.rfind("\n", start, start + CALIB_CHUNK_CHARS)
        chunk = text[start:end].strip("\n")
        if chunk:
            chunks.append(chunk)
            total += len(chunk) + 2
    return "\n\n".join(chunks) + "\n"


def _mc_line_ok(line: str) -> bool:
    s = line.strip()
    return 12 <= len(s) <= 80 and not s.startswith("#")


def build_mc_items(mc_files: list[tuple[str, str]], n_items: int = MC_ITEMS) -> list[dict]:
    """Next-line prediction: context = MC_CONTEXT_LINES consecutive lines, gold = the next line,
    distractors = lines of similar length from *other* held-out files, re-indented like the gold
    line so that indentation alone does not give the answer."""
    rng = random.Random(SEED + 2)
    lines_by_file = [(rel, text.split("\n")) for rel, text in mc_files]
    pool = [
        (fi, line.strip())
        for fi, (_, lines) in enumerate(lines_by_file)
        for line in lines
        if _mc_line_ok(line)
    ]
    candidates = []
    for fi, (_, lines) in enumerate(lines_by_file):
        for i in range(MC_CONTEXT_LINES, len(lines)):
            ctx = lines[i - MC_CONTEXT_LINES : i]
            if _mc_line_ok(lines[i]) and sum(bool(c.strip()) for c in ctx) >= MC_CONTEXT_LINES // 2:
                candidates.append((fi, i))
    rng.shuffle(candidates)
    items, used, per_file = [], set(), [0] * len(lines_by_file)
    for fi, i in candidates:
        if len(items) >= n_items:
            break
        if per_file[fi] >= MC_MAX_PER_FILE:
            continue
        lines = lines_by_file[fi][1]
        gold = lines[i]
        # keep items apart from each other within a file
        if any((fi, j) in used for j in range(i - MC_CONTEXT_LINES, i + MC_CONTEXT_LINES + 1)):
            continue
        indent = gold[: len(gold) - len(gold.lstrip())]
        glen = len(gold.strip())
        similar = [s for f, s in pool if f != fi and abs(len(s) - glen) <= max(3, glen // 5) and s != gold.strip()]
        similar = sorted(set(similar))
        if len(similar) < 3:
            continue
        distractors = [indent + s for s in rng.sample(similar, 3)]
        choices = ["\n" + gold] + ["\n" + d for d in distractors]
        order = list(range(4))
        rng.shuffle(order)
        items.append(
            {
                "context": "\n".join(lines[i - MC_CONTEXT_LINES : i]),
                "choices": [choices[k] for k in order],
                "gold": order.index(0),
            }
        )
        used.add((fi, i))
        per_file[fi] += 1
    return items


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    bos = tok.token_to_id("<|bos|>")  # the tokenizer adds <|bos|> itself: the model is trained on <bos> doc <eos>
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B:1", special_tokens=[("<|bos|>", bos)]),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- model


def make_config(tokenizer):
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        intermediate_size=512,
        moe_intermediate_size=128,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_rope_head_dim=32,
        qk_nope_head_dim=32,
        v_head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        rope_interleave=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    return cfg


def check_linear_widths(model: nn.Module, min_in: int = 64) -> None:
    """Every nn.Linear (and every fused expert projection) must read at least `min_in` features."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            assert mod.in_features >= min_in, f"{name}: in_features={mod.in_features} < {min_in}"
    for name, p in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert p.shape[-1] >= min_in, f"{name}: in_features={p.shape[-1]} < {min_in}"


class ExpertLoadTracker:
    """Counts per-expert token assignments via forward hooks on each MoE router (`mlp.gate`)."""

    def __init__(self, model: nn.Module):
        self.routers: dict[str, nn.Module] = {}
        for name, mod in model.named_modules():
            if name.endswith("mlp.gate") and hasattr(mod, "e_score_correction_bias"):
                self.routers[name.removesuffix(".mlp.gate")] = mod
        self.step_counts = {k: torch.zeros(r.num_experts, dtype=torch.long) for k, r in self.routers.items()}
        self.total_counts = {k: torch.zeros(r.num_experts, dtype=torch.long) for k, r in self.routers.items()}
        self.handles = [r.register_forward_hook(self._hook(k)) for k, r in self.routers.items()]

    def _hook(self, key):
        def hook(module, inputs, output):
            _, _, topk_indices = output
            counts = torch.bincount(topk_indices.reshape(-1).detach().cpu(), minlength=module.num_experts)
            self.step_counts[key] += counts
            self.total_counts[key] += counts

        return hook

    def reset_total(self) -> None:
        for v in self.total_counts.values():
            v.zero_()

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): bias_i += gamma * sign(mean_load - load_i)."""
        for key, router in self.routers.items():
            load = self.step_counts[key].float()
            router.e_score_correction_bias += gamma * torch.sign(load.mean() - load).to(
                router.e_score_correction_bias.dtype
            )
            self.step_counts[key].zero_()

    def fractions(self) -> dict[str, list[float]]:
        out = {}
        for key, counts in self.total_counts.items():
            tot = max(int(counts.sum()), 1)
            out[key] = [round(int(c) / tot, 4) for c in counts]
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def sliding_window_nll(
    model, ids: list[int], context: int = PPL_CONTEXT, stride: int = PPL_STRIDE, batch_size: int = 16
) -> tuple[float, int]:
    """Sum of NLL (nats) and number of scored tokens. Windows of `context` tokens start every
    `stride` tokens; each window scores only the tokens no earlier window scored, so every token
    after the first is scored once, with up to `context - 1` tokens of left context."""
    model.eval()
    n = len(ids)
    windows = []  # (begin, end, index of the first newly scored target in the window)
    begin = prev_end = 0
    while prev_end < n:
        end = min(begin + context, n)
        windows.append((begin, end, max(prev_end, begin + 1) - (begin + 1)))
        prev_end, begin = end, begin + stride
    ids_t = torch.tensor(ids, dtype=torch.long)
    total, count = 0.0, 0
    for length in sorted({e - b for b, e, _ in windows}):
        group = [w for w in windows if w[1] - w[0] == length]
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            batch = torch.stack([ids_t[b:e] for b, e, _ in chunk])
            logits = model(input_ids=batch).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
            for row, (_, _, first_new) in zip(nll, chunk):
                total += float(row[first_new:].sum())
                count += int(row.numel() - first_new)
    return total, count


def heldout_perplexity(model, tokenizer, text: str, context: int = PPL_CONTEXT, stride: int = PPL_STRIDE) -> dict:
    ids = encode(tokenizer, text)
    t0 = time.time()
    total, count = sliding_window_nll(model, ids, context, stride)
    return {
        "ppl": math.exp(total / count),
        "nll_per_token": total / count,
        "tokens": count,
        "bits_per_byte": total / math.log(2) / len(text.encode("utf-8")),
        "seconds": time.time() - t0,
    }


@torch.no_grad()
def mc_accuracy(model, tokenizer, items: list[dict], items_per_batch: int = 8) -> dict:
    """lm-eval style: score(choice) = sum log p(choice tokens | context); acc and acc_norm
    (score divided by the choice's length in bytes)."""
    model.eval()
    pad = tokenizer.pad_token_id
    correct = correct_norm = 0
    for start in range(0, len(items), items_per_batch):
        chunk = items[start : start + items_per_batch]
        seqs, conts = [], []
        for item in chunk:
            ctx_ids = encode(tokenizer, item["context"])
            for choice in item["choices"]:
                whole = encode(tokenizer, item["context"] + choice)
                if whole[: len(ctx_ids)] == ctx_ids:
                    cont = whole[len(ctx_ids) :]
                else:  # tokenisation merged across the boundary
                    cont = encode(tokenizer, choice)
                seqs.append((ctx_ids + cont)[-(PPL_CONTEXT + 1) :])
                conts.append(len(cont))
        width = max(len(s) for s in seqs)
        batch = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            batch[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        logp = model(input_ids=batch, attention_mask=mask).logits.float().log_softmax(-1)
        scores = []
        for r, s in enumerate(seqs):
            pos = torch.arange(len(s) - conts[r], len(s))
            scores.append(float(logp[r, pos - 1, batch[r, pos]].sum()))
        for k, item in enumerate(chunk):
            sc = scores[4 * k : 4 * k + 4]
            norm = [v / len(c.encode("utf-8")) for v, c in zip(sc, item["choices"])]
            correct += int(max(range(4), key=sc.__getitem__) == item["gold"])
            correct_norm += int(max(range(4), key=norm.__getitem__) == item["gold"])
    n = max(len(items), 1)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": len(items)}


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


# --------------------------------------------------------------------------- main


def _fmt_size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget of the training loop")
    parser.add_argument("--max-tokens", type=int, default=50_000_000, help="token budget of the training loop")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="assets root")
    parser.add_argument("--batch-size", type=int, default=0, help="sequences per step (0: chosen from throughput)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=40)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    t_start = time.time()
    torch.manual_seed(SEED)
    random.seed(SEED)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3ForCausalLM

    model_dir = args.out / "tiny_deepseek_v3"
    data_dir = args.out / "data"
    model_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)

    # ---- corpus and frozen data
    corpus = collect_corpus()
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

    # ---- tokenizer
    t0 = time.time()
    tokenizer = train_tokenizer([t for _, t in corpus.train])
    for _, t in ppl_files[:3] + mc_files[:3]:
        assert tokenizer.decode(encode(tokenizer, t)) == t, "byte-level round trip failed"
    train_ids = tokenizer([t for _, t in corpus.train], add_special_tokens=False)["input_ids"]
    train_tokens = sum(len(x) for x in train_ids)
    print(
        f"tokenizer: vocab {len(tokenizer)}, {train_tokens:,} training tokens "
        f"({train_chars / train_tokens:.2f} chars/token), {time.time() - t0:.1f}s",
        flush=True,
    )
    windows = make_windows(train_ids, tokenizer.bos_token_id, tokenizer.eos_token_id)

    # ---- model
    torch.manual_seed(SEED)
    config = make_config(tokenizer)
    model = DeepseekV3ForCausalLM(config)
    check_linear_widths(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    init_mc = mc_accuracy(model, tokenizer, mc_items)
    print(f"untrained MC: acc {init_mc['acc']:.3f} acc_norm {init_mc['acc_norm']:.3f}", flush=True)

    tracker = ExpertLoadTracker(model)
    tracker.reset_total()
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    budget_s = args.minutes * 60.0
    batch_size = args.batch_size or 16
    probe_steps = 8
    step = tokens_seen = cursor = epochs = 0
    losses: list[float] = []
    milestones: list[tuple[int, int, float, float, float]] = []  # ~every 10% of the budget
    train_time = 0.0
    probe_t0 = probe_tok0 = None
    tail_reset_done = False
    pbar = tqdm(total=100, desc="train", unit="%", mininterval=15, file=sys.stdout, bar_format="{l_bar}{bar:20}{r_bar}")
    model.train()
    progress = 0.0
    while progress < 1.0:
        t_step = time.time()
        if cursor + batch_size > len(windows):
            cursor, epochs = 0, epochs + 1
        batch = windows[cursor : cursor + batch_size]
        cursor += batch_size
        lr = lr_at(step, progress, args.lr, args.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        out = model(input_ids=batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tracker.update_bias(BIAS_UPDATE_GAMMA)
        loss = float(out.loss.detach())
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
    train_loads = tracker.fractions()
    final_loss = sum(losses[-20:]) / len(losses[-20:])
    print(
        f"trained {step} steps, {tokens_seen:,} tokens ({tokens_seen / train_tokens:.2f} epochs), "
        f"{train_time:.0f}s, final train loss (mean of last 20 steps) {final_loss:.4f}",
        flush=True,
    )

    # ---- evaluation
    model.eval()
    tracker.reset_total()
    ppl = heldout_perplexity(model, tokenizer, heldout_text)
    heldout_loads = tracker.fractions()
    tracker.remove()
    mc = mc_accuracy(model, tokenizer, mc_items)
    print(f"held-out ppl {ppl['ppl']:.3f} ({ppl['tokens']} tokens, {ppl['seconds']:.1f}s); MC acc {mc['acc']:.3f} acc_norm {mc['acc_norm']:.3f}", flush=True)

    # ---- save and verify the round trip
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
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        expert_keys = {k: f.get_slice(k).get_shape() for k in f.keys() if ".mlp.experts." in k}
    layout = sorted(k for k in expert_keys if k.startswith("model.layers.1."))

    # ---- model card
    wall = time.time() - t_start
    sizes = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir()) if p.is_file()}
    sizes.update({f"data/{p.name}": p.stat().st_size for p in sorted(data_dir.iterdir()) if p.is_file()})
    n_tok_heldout = len(encode(tokenizer, heldout_text))
    load_rows = []
    for key in train_loads:
        load_rows.append(
            f"| {key} | " + " ".join(f"{v:.3f}" for v in train_loads[key]) + " | "
            + " ".join(f"{v:.3f}" for v in heldout_loads[key]) + " |"
        )
    biases = {
        k: [round(float(v), 3) for v in r.e_score_correction_bias] for k, r in tracker.routers.items()
    }
    card = f"""# tiny_deepseek_v3

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

## Corpus and split

`*.py`, `*.txt` and `*.rst` files of the CPython {platform.python_version()} standard library
(see `../data/LICENSE-DATA.md`), {len(corpus.train)} training files ({train_chars / 1e6:.2f}M characters,
{train_tokens:,} tokens, {train_chars / train_tokens:.2f} characters/token) and {len(corpus.heldout)} held-out files,
split by a hash of the relative path.

## Training

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

## Evaluation

- **held-out perplexity {ppl['ppl']:.2f}** on `data/heldout.txt` ({n_tok_heldout:,} tokens; sliding window, context {PPL_CONTEXT},
  stride {PPL_STRIDE}, no BOS; {ppl['bits_per_byte']:.3f} bits/byte)
- **multiple choice `data/mc.jsonl`** ({mc['n']} items, 4 choices, next-line prediction): acc **{mc['acc']:.3f}**,
  acc_norm {mc['acc_norm']:.3f} (untrained model with the same init: acc {init_mc['acc']:.3f}, acc_norm {init_mc['acc_norm']:.3f}; chance 0.25)

## Expert load (fraction of routed token slots per expert 0..7)

| layer | last 10% of training | held-out text |
|---|---|---|
{chr(10).join(load_rows)}

Final `e_score_correction_bias`: {json.dumps(biases)}

## Files

{chr(10).join(f"- `{k}`: {_fmt_size(v)}" for k, v in sizes.items())}
"""
    (model_dir / "TRAINING.md").write_text(card, encoding="utf-8")
    write_data_license(data_dir, corpus, ppl_files, mc_files, mc_items, calib_text, heldout_text)
    print(card)
    return 0


def write_data_license(data_dir: Path, corpus: Corpus, ppl_files, mc_files, mc_items, calib_text, heldout_text) -> None:
    text = f"""# Data: origin and license

All text in this directory, and the text the bundled `tiny_deepseek_v3` model was trained on,
comes from the standard library of CPython {platform.python_version()}
(`sysconfig.get_paths()["stdlib"]`), which is distributed under the
Python Software Foundation License Version 2 (https://docs.python.org/3/license.html).
Copyright (c) 2001 Python Software Foundation; All Rights Reserved. The text is used unmodified
(line endings normalised to `\\n`).

## Corpus

All `*.py`, `*.txt` and `*.rst` files under the stdlib directory, recursively, excluding
`site-packages/`, any `test/` or `tests/` directory (so also `lib2to3/tests`), `idlelib/idle_test/`,
`__pycache__/`, and the build-specific `config-3.*/` and `_sysconfigdata_*.py`. Files that are not valid
UTF-8 are skipped. Files are sorted by relative path, so the corpus is the same on every machine
with the same Python version.

## Split

A file is held out when `int.from_bytes(sha256(relpath).digest()[:8], "big") % 1000 < {HELDOUT_PERMILLE}`
(about 3% of the files). This gives {len(corpus.train)} training files and {len(corpus.heldout)} held-out files.
The tokenizer and the model were trained on the training files only.

- `heldout.txt` ({len(heldout_text):,} characters): held-out files, in path order, concatenated
  (blank line between files) until at least {HELDOUT_TXT_MIN_CHARS:,} characters:
  {", ".join(f"`{r}`" for r, _ in ppl_files)}.
- `mc.jsonl` ({len(mc_items)} items): built from the remaining held-out files, which do not overlap
  `heldout.txt`: {", ".join(f"`{r}`" for r, _ in mc_files)}.
  Each item: `context` = {MC_CONTEXT_LINES} consecutive lines of a file, the gold choice = the next
  line, 3 distractors = lines of similar length (within 20%) from the other MC files, re-indented
  like the gold line (at most {MC_MAX_PER_FILE} items per file, items at least {MC_CONTEXT_LINES} lines
  apart); every choice starts with the `\\n` that joins it to the context; choice order
  shuffled with a fixed seed. Score a choice by the log-likelihood of the choice text given the context.
- `calibration.txt` ({len(calib_text):,} characters): line-aligned chunks of about {CALIB_CHUNK_CHARS:,} characters
  from randomly chosen (fixed seed) training files, blank line between chunks.

Everything is regenerated by `python -m dsq.tools.train_tiny`.
"""
    (data_dir / "LICENSE-DATA.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
