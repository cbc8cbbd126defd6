"""Train the bundled tiny DeepSeek-V4 checkpoint from scratch on CPU.

The model is a ``DeepseekV4ForCausalLM`` with every V4 part at the size of the bundled tiny
DeepSeek-V3 (hidden 256, 4 layers, 8 routed experts top-2, the same 2048-token tokenizer):

- attention: a sliding-window layer, two compressed sparse attention (CSA) layers with a lightning
  indexer and one heavily compressed attention (HCA) layer (DeepSeek-V4 report, sections 2.3.1 and
  2.3.2), shared-KV MQA with per-head sinks and a grouped low-rank output projection;
- MoE: a hash-routed layer (a frozen ``tid2eid`` token -> experts table, :func:`balanced_hash_table`)
  and three top-k layers (``sqrtsoftplus`` router, aux-loss-free balancing), each with a shared expert;
- residual: ``hc_mult`` = 2 hyper-connection streams (mHC, section 2.2).

Window sizes suit the 256-token windows the toolkit evaluates with: at position 255 the sliding
window covers 64 tokens, a CSA layer has 64 compressed entries of which its indexer keeps 16, and an
HCA layer has 16 entries (compress rate 16).

It reads the text of :mod:`dsq.tools.train_tiny` (the training split of the CPython standard
library, the same shuffled 256-token windows) with the tokenizer of ``tiny_deepseek_v3``, so the
bundled ``data/heldout.txt``, ``data/mc.jsonl`` and ``data/calibration.txt`` apply unchanged; it
trains with train_tiny's loop (AdamW, warmup + cosine over a time/token budget, router-bias
updates), rounds the trained weights to their storage dtypes (bfloat16; the parameters transformers
keeps in float32 stay float32), scores held-out perplexity and multiple choice on the rounded
weights in fp32, saves with ``save_pretrained`` (V4's own tensor names on disk) and checks that
:func:`dsq.core.loading.load_checkpoint` gives back the same logits.

Usage::

    python -m dsq.tools.train_tiny_v4 [--minutes 26] [--out DIR]

``--out`` is the model directory (default ``dsq/assets/tiny_deepseek_v4``). It is written
atomically; an earlier output of this script there (it holds ``TRAINING.md``) is replaced, anything
else is left alone and the run stops (exit 2).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

# Sleeping OpenMP workers degrade gracefully on a busy 2-core machine (see dsq.tools.train_tiny).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

from dsq.assets import data_file, tiny_model_dir, tiny_v4_model_dir
from dsq.core.atomic import atomic_directory
from dsq.tools.tiny_corpus import SEED
from dsq.tools.tiny_model import (
    PPL_CONTEXT,
    VOCAB_SIZE,
    ExpertLoadTracker,
    check_linear_widths,
    encode,
    heldout_perplexity,
    mc_accuracy,
)
from dsq.tools.train_llama import (
    PRECISIONS,
    EvalData,
    TrainData,
    card_training,
    load_eval_data,
    load_train_data,
    run_trainer,
    trainer_parser,
)
from dsq.tools.train_tiny import (
    Evaluation,
    evaluate_trained,
    TrainLog,
    card_evaluation,
    card_expert_load,
    card_files,
    save_and_verify,
    train_model,
)

MARKER = "TRAINING.md"  # the file that marks a directory as this script's output
SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA, CSA)
MLP_LAYER_TYPES = ("hash_moe", "moe", "moe", "moe")
DATA_FILES = ("calibration.txt", "heldout.txt", "mc.jsonl")  # the bundled sets it is evaluated and calibrated on
STORAGE_DTYPE = torch.bfloat16  # of the weights transformers does not keep in float32


@dataclass(frozen=True)
class Result:
    """What the card reports besides the configuration (the fields train_llama's training section reads)."""

    n_params: int
    data: TrainData
    log: TrainLog
    ev: Evaluation  # of the stored (rounded) weights, in fp32; loads include the hash-routed layers
    init_ppl: dict  # heldout_perplexity of the untrained model (same init)
    wall: float  # seconds, from the start of main to the card
    sizes: dict[str, int]  # bytes, by file name (model files, then data/...)
    disk_names: tuple[str, ...]  # tensor names in model.safetensors of layer 1 (a CSA + top-k MoE layer)


# --------------------------------------------------------------------------- model


def make_v4_config(tokenizer):
    """The ``DeepseekV4Config`` of the tiny model (vocabulary and special tokens from ``tokenizer``).

    Args:
        tokenizer: the bundled tiny DeepSeek-V3's tokenizer.

    Returns:
        A config for a ~5.4M-parameter model with every V4 part (see the module docstring).
    """
    from transformers import DeepseekV4Config

    cfg = DeepseekV4Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=list(LAYER_TYPES),
        mlp_layer_types=list(MLP_LAYER_TYPES),
        num_attention_heads=4,
        num_key_value_heads=1,  # V4's shared K=V head
        head_dim=64,
        partial_rotary_factor=0.25,  # RoPE on the last 16 of 64 channels (V4: 64 of 512)
        q_lora_rank=128,
        o_groups=2,
        o_lora_rank=64,
        sliding_window=64,
        compress_rates={CSA: 4, HCA: 16},
        index_n_heads=4,
        index_head_dim=32,
        index_topk=16,
        hc_mult=2,
        moe_intermediate_size=128,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg.architectures = ["DeepseekV4ForCausalLM"]
    return cfg


def balanced_hash_table(token_counts: torch.Tensor, num_experts: int, top_k: int, seed: int = SEED) -> torch.Tensor:
    """A frozen token -> experts table (``tid2eid``) for a hash-routed MoE layer, balanced on the training text.

    Tokens are taken in decreasing training frequency (equal counts in a seeded random order); each
    gets the ``top_k`` experts with the least load so far (equal loads in a seeded random order) and
    adds its count plus one to their loads. Every expert so serves about the same share of the
    training tokens, and tokens absent from training are spread evenly too.

    Args:
        token_counts: ``(vocab,)`` occurrences of each token id in the training text.
        num_experts: routed experts of the layer.
        top_k: experts per token.
        seed: seed of the tie-breaking order.

    Returns:
        ``(vocab, top_k)`` int64 expert ids, distinct within each row.

    Example:
        >>> balanced_hash_table(torch.tensor([5, 0, 3, 1]), num_experts=4, top_k=2).shape
        torch.Size([4, 2])
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..num_experts ({num_experts}), got {top_k}")
    rng = random.Random(seed)
    counts = [int(c) for c in token_counts.tolist()]
    tie = [rng.random() for _ in counts]
    load = [0] * num_experts
    table = torch.empty(len(counts), top_k, dtype=torch.long)
    for token in sorted(range(len(counts)), key=lambda t: (-counts[t], tie[t])):
        expert_tie = [rng.random() for _ in range(num_experts)]
        chosen = sorted(range(num_experts), key=lambda e: (load[e], expert_tie[e]))[:top_k]
        for e in chosen:
            load[e] += counts[token] + 1
        table[token] = torch.tensor(chosen)
    return table


def hash_routers(model: nn.Module) -> dict[str, nn.Module]:
    """The hash routers of ``model`` (modules with a ``tid2eid`` table), keyed by their decoder layer."""
    return {name.removesuffix(".mlp.gate"): m for name, m in model.named_modules() if hasattr(m, "tid2eid")}


def hash_loads(table: torch.Tensor, ids: torch.Tensor, num_experts: int) -> list[float]:
    """Fraction of the routed token slots of ``ids`` (any shape) that ``table`` sends to each expert."""
    counts = torch.bincount(table[ids.reshape(-1)].reshape(-1), minlength=num_experts)
    return [round(int(c) / max(int(counts.sum()), 1), 4) for c in counts]


def storage_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """The dtype each floating-point parameter and buffer of ``model`` is saved in.

    ``STORAGE_DTYPE``, except what transformers keeps in float32 when it loads the model in that
    dtype (``_keep_in_fp32_modules_strict``: hyper-connections, sinks, norms, compressor position
    biases, router biases), read off a copy of the model built on the meta device.
    """
    with torch.device("meta"):
        ref = type(model)._from_config(copy.deepcopy(model.config), dtype=STORAGE_DTYPE)
    tensors = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    return {name: t.dtype for name, t in tensors.items() if t.is_floating_point()}


@torch.no_grad()
def cast_to(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Cast every parameter and buffer named in ``dtypes`` to its dtype, in place."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in dtypes:
            t.data = t.data.to(dtypes[name])


@torch.no_grad()
def round_to_storage(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Round the float32 weights to the values their storage dtypes hold, keeping them float32."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in dtypes:
            t.data = t.data.to(dtypes[name]).float()


# --------------------------------------------------------------------------- run steps


def untrained_scores(model: nn.Module, tokenizer, data: EvalData) -> tuple[dict, dict]:
    """Held-out perplexity and MC accuracy of the untrained model (the baseline the card compares with)."""
    ppl = heldout_perplexity(model, tokenizer, data.heldout_text)
    mc = mc_accuracy(model, tokenizer, data.mc_items)
    print(f"untrained: held-out ppl {ppl['ppl']:.1f}, MC acc {mc['acc']:.3f} acc_norm {mc['acc_norm']:.3f}", flush=True)
    return ppl, mc


def train(model: nn.Module, data: TrainData, args: argparse.Namespace) -> tuple[TrainLog, ExpertLoadTracker]:
    """Run train_tiny's loop (router-bias updates included) in the precision of ``args``.

    Returns:
        The log and the expert-load tracker of the top-k routers (still attached; its totals
        cover the last 10% of training).
    """
    tracker = ExpertLoadTracker(model)
    log = train_model(PRECISIONS[args.precision](model), data.windows, tracker, args)
    print(f"trained {log.steps} steps, {log.tokens_seen:,} tokens ({log.tokens_seen / data.n_tokens:.2f} epochs), "
          f"{log.seconds:.0f}s, final train loss (mean of last 20 steps) {log.final_loss:.4f}", flush=True)
    return log, tracker


def evaluate(model: nn.Module, tokenizer, tracker: ExpertLoadTracker, data: EvalData, init_mc: dict,
             train_windows: torch.Tensor) -> Evaluation:
    """Held-out perplexity, MC accuracy and expert loads (hash-routed layers too) of the trained model, in fp32;
    detaches ``tracker``."""
    ev = evaluate_trained(model, tokenizer, tracker, data, init_mc)
    heldout_ids = torch.tensor(encode(tokenizer, data.heldout_text))
    n = model.config.n_routed_experts
    routers = hash_routers(model)
    train_hash = {f"{k} (hash)": hash_loads(r.tid2eid, train_windows, n) for k, r in routers.items()}
    heldout_hash = {f"{k} (hash)": hash_loads(r.tid2eid, heldout_ids, n) for k, r in routers.items()}
    return replace(ev, train_loads={**train_hash, **ev.train_loads}, heldout_loads={**heldout_hash, **ev.heldout_loads})


def save_checked(model: nn.Module, tokenizer, out_dir: Path, heldout_text: str) -> None:
    """Save ``model`` (float32 holding storage-dtype values) in its storage dtypes, then check the reloads.

    train_tiny's :func:`save_and_verify` reloads with transformers in the stored dtypes;
    :func:`dsq.core.loading.load_checkpoint` (float32) must then give exactly the logits of ``model``.
    """
    from dsq.core.loading import load_checkpoint

    dtypes = storage_dtypes(model)
    cast_to(model, dtypes)
    save_and_verify(model, tokenizer, out_dir, heldout_text)
    model.float()
    loaded = load_checkpoint(out_dir)
    probe = torch.tensor([encode(tokenizer, heldout_text[:2000])[:PPL_CONTEXT]])
    with torch.no_grad():
        same = torch.equal(model(input_ids=probe).logits, loaded.model(input_ids=probe).logits)
    assert same, "load_checkpoint gives other logits than the saved model"
    for key, router in hash_routers(loaded.model).items():
        assert torch.equal(router.tid2eid, hash_routers(model)[key].tid2eid), f"{key}: tid2eid differs after reload"


def layer1_disk_names(model_dir: Path) -> tuple[str, ...]:
    """Tensor names of decoder layer 1 in ``model.safetensors``, sorted (experts: expert 0 only)."""
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        names = [k for k in f.keys() if ".layers.1." in k]  # noqa: SIM118 (safe_open is not iterable)
    return tuple(sorted(k for k in names if ".experts." not in k or ".experts.0." in k))


# --------------------------------------------------------------------------- model card


def _card_architecture(config, res: Result) -> str:
    csa, hca = config.compress_rates[CSA], config.compress_rates[HCA]
    n_hash = MLP_LAYER_TYPES.count("hash_moe")
    return f"""# tiny_deepseek_v4

A {res.n_params / 1e6:.2f}M-parameter `DeepseekV4ForCausalLM` trained from scratch on CPU on the training split
of the CPython {platform.python_version()} standard library, with the tokenizer of the bundled `tiny_deepseek_v3`.
A test fixture for the compression toolkit with every DeepSeek-V4 part, not a useful language model.

## Architecture

| | |
|---|---|
| layers | {len(LAYER_TYPES)}: attention {" / ".join(LAYER_TYPES)}; MLP {" / ".join(MLP_LAYER_TYPES)} |
| hidden size | {config.hidden_size}, residual kept as `hc_mult` {config.hc_mult} hyper-connection streams (Sinkhorn {config.hc_sinkhorn_iters} iterations) |
| attention | {config.num_attention_heads} query heads of {config.head_dim} (q_lora_rank {config.q_lora_rank}), one shared K=V head, interleaved RoPE on the last {config.qk_rope_head_dim} channels, per-head sinks, grouped output projection ({config.o_groups} groups x o_lora_rank {config.o_lora_rank}) |
| sliding window | {config.sliding_window} tokens, every layer |
| CSA | compress rate {csa} (overlapping windows of {2 * csa}); lightning indexer {config.index_n_heads} heads x {config.index_head_dim}, keeps the top {config.index_topk} compressed entries per query |
| HCA | compress rate {hca} |
| MoE | {config.n_routed_experts} routed experts (top-{config.num_experts_per_tok}, `{config.scoring_func}` scores, normalised, routed_scaling_factor {config.routed_scaling_factor}) + 1 shared expert, expert intermediate {config.moe_intermediate_size}, swiglu_limit {config.swiglu_limit}; {n_hash} hash-routed layer(s) with a frozen `tid2eid` table |
| vocab | {config.vocab_size} (the byte-level BPE of `tiny_deepseek_v3`) |
| embeddings | untied, max_position_embeddings {config.max_position_embeddings} |
| parameters | {res.n_params:,}; stored in bfloat16, except those transformers keeps in float32 (hyper-connections, sinks, norms, compressor position biases, router biases) |

In a {PPL_CONTEXT}-token evaluation window the token at position {PPL_CONTEXT - 1} sees {config.sliding_window} tokens through the
sliding window, plus {PPL_CONTEXT // csa} compressed entries in a CSA layer (the indexer keeps {config.index_topk})
or {PPL_CONTEXT // hca} in an HCA layer.

The hash-routed layer's `tid2eid` ({config.vocab_size} x {config.num_experts_per_tok}) assigns tokens in decreasing training
frequency to the least loaded experts (seeded ties), so each expert serves about the same share of training tokens;
it is a buffer and never trained.

Tensor names of layer 1 in `model.safetensors` (V4's own names; transformers renames them on load; experts: expert 0 of {config.n_routed_experts}):

```
{chr(10).join(res.disk_names)}
```

"""


def _card_balancing() -> str:
    from dsq.tools.train_tiny import BIAS_UPDATE_GAMMA

    return f"""- top-k MoE layers: aux-loss-free balancing, after each step
  `e_score_correction_bias += {BIAS_UPDATE_GAMMA:g} * sign(mean_load - load)`; the hash-routed layer's table stays fixed
- weights trained in float32 (optimizer state float32), then rounded to bfloat16 for storage; every
  number below is of the stored weights, computed in float32

"""


def _card_untrained(res: Result) -> str:
    return f"""- untrained model with the same init: held-out perplexity {res.init_ppl['ppl']:.1f}

"""


def model_card(args: argparse.Namespace, command: str, config, tracker: ExpertLoadTracker, res: Result) -> str:
    """``TRAINING.md``: architecture, training, evaluation, expert loads and files.

    Args:
        args: the command line, parsed.
        command: the command line as typed.
        config: the model's ``DeepseekV4Config``.
        tracker: the top-k routers' load tracker (their final ``e_score_correction_bias`` is reported).
        res: what the run measured.

    Returns:
        The card's Markdown text.
    """
    n_tokens = res.ev.ppl["tokens"] + 1  # every token but the first is scored
    return (
        _card_architecture(config, res)
        + card_training(args, command, res)
        + _card_balancing()
        + card_evaluation(res.ev, n_tokens).rstrip("\n") + "\n" + _card_untrained(res)
        + card_expert_load(res.ev, tracker)
        + card_files(res.sizes)
    )


# --------------------------------------------------------------------------- main


def _sizes(model_dir: Path) -> dict[str, int]:
    """Bytes of the model files and of the bundled data files the card's numbers come from."""
    sizes = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir()) if p.is_file()}
    sizes.update({f"data/{name}": data_file(name).stat().st_size for name in DATA_FILES})
    return sizes


def _run(args: argparse.Namespace, command: str, t_start: float) -> str:
    """Train, evaluate and save into ``args.out``; returns the model card."""
    from transformers import AutoTokenizer, DeepseekV4ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir()))
    train_data = load_train_data(tokenizer)
    eval_data = load_eval_data(args.heldout_chars, args.mc_items)
    torch.manual_seed(SEED)
    config = make_v4_config(tokenizer)
    model = DeepseekV4ForCausalLM(config)
    counts = torch.bincount(train_data.windows.reshape(-1), minlength=config.vocab_size)
    table = balanced_hash_table(counts, config.n_routed_experts, config.num_experts_per_tok)
    for router in hash_routers(model).values():
        router.tid2eid.copy_(table)
    check_linear_widths(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    init_ppl, init_mc = untrained_scores(model, tokenizer, eval_data)
    log, tracker = train(model, train_data, args)
    round_to_storage(model, storage_dtypes(model))
    ev = evaluate(model, tokenizer, tracker, eval_data, init_mc, train_data.windows)
    with atomic_directory(args.out, overwrite=True, marker=MARKER) as tmp:
        save_checked(model, tokenizer, tmp, eval_data.heldout_text)
        res = Result(n_params, train_data, log, ev, init_ppl, time.time() - t_start, _sizes(tmp), layer1_disk_names(tmp))
        card = model_card(args, command, config, tracker, res)
        (tmp / MARKER).write_text(card, encoding="utf-8")
    return card


def main(argv: list[str] | None = None) -> int:
    """Train the model and write it to ``--out`` (default ``sys.argv[1:]``); 0, or 2 when ``--out`` may not be written."""
    parser = trainer_parser(__doc__.split("\n\n")[0], minutes=26.0, out=tiny_v4_model_dir(),
                            out_help="model directory (default: the bundled one)", lr=3e-3)
    return run_trainer(argv, "dsq.tools.train_tiny_v4", parser, _run)


if __name__ == "__main__":
    raise SystemExit(main())
