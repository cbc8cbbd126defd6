"""The bundled tiny model's tokenizer, architecture and evaluation (held-out perplexity, multiple choice).

The tokenizer is a 2048-token byte-level BPE; the model a ~4.8M-parameter ``DeepseekV3ForCausalLM``
(MLA attention, 1 dense layer + 3 MoE layers with 8 routed experts, top-2, 1 shared expert) whose
routers are balanced without an auxiliary loss (:class:`ExpertLoadTracker`).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>"]
PPL_CONTEXT = 256
PPL_STRIDE = 128


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
