"""Multiple-choice accuracy by log-likelihood (zero- or few-shot), following lm-evaluation-harness.

Each choice is scored by the summed log-probability of its tokens given the context.
Context and continuation are tokenized the way lm-evaluation-harness does it: trailing
whitespace of the context moves to the front of the continuation, the whole string
``context + choice`` is encoded once, and the continuation tokens are those after the
first ``len(encode(context))`` tokens, so a BPE merge across the boundary is kept.

``acc`` picks the choice with the highest summed log-probability; ``acc_norm`` divides
that sum by the choice's length in UTF-8 bytes first.

Few-shot (:class:`FewShot`): each item's context is preceded by ``k`` exemplars, each an other
item's context followed by its gold choice, joined and closed by the delimiter (``"\\n\\n"``, as
lm-evaluation-harness's default ``fewshot_delimiter``). The exemplars of item ``i`` are drawn
without replacement by ``random.Random(f"{seed}-{i}")`` from the exemplar set, leaving out every
exemplar equal to the item itself, so prompts do not depend on the run, the process or the
order in which items are scored.

An input longer than the model's window loses tokens from the left of its context (exemplars
first); the continuation is never truncated.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dsq.core.errors import DataError
from dsq.eval.data import MCItem
from dsq.core.tokens import special_tokens


@dataclass(frozen=True)
class MCResult:
    """Multiple-choice accuracy.

    Attributes:
        acc: Fraction of items whose highest-likelihood choice is the gold one (0..1).
        acc_norm: Same with log-likelihood divided by the choice's UTF-8 byte length.
        n: Number of items.
        num_fewshot: Exemplars before each item's context (0: zero-shot).
        truncated: (item, choice) inputs whose context was cut from the left to fit the model's window.
    """

    acc: float
    acc_norm: float
    n: int
    num_fewshot: int = 0
    truncated: int = 0


@dataclass(frozen=True)
class FewShot:
    """Few-shot prompting of multiple-choice items.

    Attributes:
        num_fewshot: Exemplars ``k`` put before each item's context (0: zero-shot).
        seed: Seed of the exemplar draw; item ``i`` uses ``random.Random(f"{seed}-{i}")``.
        delimiter: Text after every exemplar (lm-evaluation-harness's ``fewshot_delimiter``).
        pool: Items the exemplars are drawn from (``None``: the evaluated items themselves).
            Exemplars equal to the item being prompted are never drawn.
        source: Where the exemplars come from (a file name), for error messages.

    Example:
        >>> prompts = fewshot_prompts(items, FewShot(num_fewshot=2, source="mc.jsonl"))
    """

    num_fewshot: int = 0
    seed: int = 1234
    delimiter: str = "\n\n"
    pool: tuple[MCItem, ...] | None = None
    source: str = "the multiple-choice items"

    def __post_init__(self) -> None:
        if isinstance(self.num_fewshot, bool) or not isinstance(self.num_fewshot, int) or self.num_fewshot < 0:
            raise ValueError(f"num_fewshot must be an integer >= 0, got {self.num_fewshot!r}")


def _where(item: MCItem, index: int) -> str:
    """``multiple-choice item 3 (mc.jsonl, line 5)``: the item's index and, when known, its file and line."""
    return f"multiple-choice item {index}" + (f" ({item.origin})" if item.origin else "")


def _exemplar(item: MCItem) -> str:
    """An item rendered as a solved example: its context followed by its gold choice."""
    return item.context + item.choices[item.gold]


def fewshot_prompts(items: Sequence[MCItem], fewshot: FewShot) -> list[MCItem]:
    """The items with ``fewshot.num_fewshot`` solved exemplars prepended to each context.

    Args:
        items: Items to prompt (item ``i`` draws with ``random.Random(f"{seed}-{i}")``).
        fewshot: Number of exemplars, seed, delimiter and exemplar set.

    Returns:
        New items whose context is ``ex_1 + delim + ... + ex_k + delim + context``; choices and
        gold unchanged. With ``num_fewshot == 0`` the items themselves.

    Raises:
        DataError: The exemplar set holds fewer than ``num_fewshot`` items other than the one
            prompted (the message names ``fewshot.source``).
    """
    k = fewshot.num_fewshot
    if k == 0:
        return list(items)
    pool = list(items) if fewshot.pool is None else list(fewshot.pool)
    positions: dict[MCItem, list[int]] = {}
    for j, example in enumerate(pool):
        positions.setdefault(example, []).append(j)
    prompts: list[MCItem] = []
    for index, item in enumerate(items):
        excluded = positions.get(item, [])  # ascending
        available = len(pool) - len(excluded)
        if available < k:
            raise DataError(
                f"multiple-choice num_fewshot={k}: {fewshot.source} has {len(pool)} item(s), {available} of them "
                f"usable as exemplars of {_where(item, index)} (the item itself and its copies are left out); "
                "lower num_fewshot or give a larger fewshot_data file"
            )
        rng = random.Random(f"{fewshot.seed}-{index}")
        chosen = []
        for pick in rng.sample(range(available), k):
            for position in excluded:  # compacted index -> pool index, skipping the excluded positions
                if pick >= position:
                    pick += 1
                else:
                    break
            chosen.append(pool[pick])
        prefix = "".join(_exemplar(example) + fewshot.delimiter for example in chosen)
        prompts.append(replace(item, context=prefix + item.context))
    return prompts


@dataclass(frozen=True)
class _Request:
    """One (item, choice) pair: the model input; its last ``len(continuation)`` positions are scored."""

    item: int
    choice: int
    input_ids: tuple[int, ...]
    continuation: tuple[int, ...]
    truncated: bool = False  # context tokens were cut from the left to fit the window


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Encode ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Split ``context + continuation`` into context and continuation tokens as lm-eval does.

    Args:
        tokenizer: A Hugging Face tokenizer.
        context: Prompt text.
        continuation: Choice text appended verbatim.

    Returns:
        ``(context_ids, continuation_ids)``; special tokens are not added.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def _prefix_ids(tokenizer: Any, add_bos: bool) -> list[int]:
    """Tokens put before every context: those ``tokenizer(text)`` puts before a text (its BOS,
    if it adds one), when requested. A suffix the tokenizer appends (EOS) ends the text, not
    the context, so it is not part of a request."""
    return list(special_tokens(tokenizer).prefix) if add_bos else []


def _requests(
    tokenizer: Any, items: Sequence[MCItem], add_bos: bool, max_length: int | None
) -> list[_Request]:
    """Tokenize every (item, choice) pair into a scoring request.

    With ``max_length`` an input longer than that loses context tokens from the left; a
    continuation longer than ``max_length`` cannot be scored whole and is an error.
    """
    prefix = _prefix_ids(tokenizer, add_bos)
    # An empty context conditions on one token, as lm-evaluation-harness: BOS, else EOS.
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    fallback = bos if bos is not None else eos
    requests: list[_Request] = []
    for item_index, item in enumerate(items):
        for choice_index, choice in enumerate(item.choices):
            context_ids, continuation_ids = encode_pair(tokenizer, item.context, choice)
            context_ids = prefix + context_ids
            if not context_ids:
                if fallback is None:
                    raise DataError(
                        f"{_where(item, item_index)} has an empty context and the tokenizer "
                        "has neither a BOS nor an EOS token to condition on"
                    )
                context_ids = [int(fallback)]
            if not continuation_ids:
                raise DataError(f"{_where(item, item_index)}, choice {choice_index} produced no tokens")
            full = context_ids + continuation_ids
            whole_length = len(full)
            if max_length is not None:
                if len(continuation_ids) > max_length:
                    raise DataError(
                        f"{_where(item, item_index)}, choice {choice_index}: its {len(continuation_ids)} "
                        f"tokens do not fit the model's window of {max_length} tokens"
                    )
                full = full[-(max_length + 1) :]  # the input is full[:-1]: at most max_length tokens
            n_scored = min(len(continuation_ids), len(full) - 1)
            requests.append(
                _Request(
                    item=item_index,
                    choice=choice_index,
                    input_ids=tuple(full[:-1]),
                    continuation=tuple(continuation_ids[len(continuation_ids) - n_scored :]),
                    truncated=len(full) < whole_length,
                )
            )
    return requests


def _score_batch(model: nn.Module, batch: list[_Request], pad_id: int) -> list[float]:
    """Summed continuation log-probabilities for a right-padded batch of requests."""
    width = max(len(r.input_ids) for r in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (batch, seq)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (batch, seq)
    for row, request in enumerate(batch):
        input_ids[row, : len(request.input_ids)] = torch.tensor(request.input_ids, dtype=torch.long)
        attention_mask[row, : len(request.input_ids)] = 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (batch, seq, vocab)
    scores: list[float] = []
    for row, request in enumerate(batch):
        end = len(request.input_ids)
        n = len(request.continuation)
        logprobs = torch.log_softmax(logits[row, end - n : end].float(), dim=-1)  # (n, vocab)
        targets = torch.tensor(request.continuation, dtype=torch.long).unsqueeze(-1)  # (n, 1)
        scores.append(logprobs.gather(-1, targets).sum().item())
    return scores


def _accuracy(items: Sequence[MCItem], loglik: list[list[float]], normalize: bool) -> float:
    """Fraction of items whose best-scoring choice is gold (first choice wins ties)."""
    correct = 0
    for item, scores in zip(items, loglik):
        if normalize:
            scores = [s / len(c.encode("utf-8")) for s, c in zip(scores, item.choices)]
        best = max(range(len(scores)), key=lambda i: scores[i])
        correct += int(best == item.gold)
    return correct / len(items)


def multiple_choice(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[MCItem],
    *,
    progress: bool = True,
    batch_size: int = 16,
    add_bos: bool = True,
    max_length: int | None = None,
    fewshot: FewShot | None = None,
) -> MCResult:
    """Score multiple-choice items by continuation log-likelihood.

    Args:
        model: Causal LM called as ``model(input_ids=..., attention_mask=...).logits``.
        tokenizer: The model's Hugging Face tokenizer.
        items: Items to score.
        progress: Show a tqdm progress bar.
        batch_size: (item, choice) pairs per forward pass; pairs are right-padded.
        add_bos: Prepend to every context the ids the tokenizer itself puts before a text
            (its BOS where ``tokenizer(text)`` adds one; nothing for GPT-2 style tokenizers).
        max_length: The model's window: an input longer than this loses context tokens from
            the left (few-shot exemplars first); the continuation is never cut (``None``: no limit).
        fewshot: Exemplars to put before each context (``None``: zero-shot).

    Returns:
        ``acc``, ``acc_norm``, the number of items, ``num_fewshot`` and how many inputs were truncated.

    Raises:
        DataError: No items, too few exemplars for ``fewshot``, or a pair cannot be tokenized
            into a scorable request (e.g. a choice longer than ``max_length``).
    """
    if not items:
        raise DataError("multiple-choice evaluation needs at least one item")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    fewshot = fewshot or FewShot()
    requests = _requests(tokenizer, fewshot_prompts(items, fewshot), add_bos, max_length)
    truncated = sum(r.truncated for r in requests)
    # Longest first: batches hold similar lengths, and an out-of-memory shows up at once.
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].input_ids))
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    loglik = [[0.0] * len(item.choices) for item in items]
    with torch.inference_mode(), tqdm(total=len(requests), desc="multiple choice", unit="pair", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = [requests[i] for i in order[start : start + batch_size]]
            for request, score in zip(batch, _score_batch(model, batch, pad_id)):
                loglik[request.item][request.choice] = score
            bar.update(len(batch))
    return MCResult(
        acc=_accuracy(items, loglik, normalize=False),
        acc_norm=_accuracy(items, loglik, normalize=True),
        n=len(items),
        num_fewshot=fewshot.num_fewshot,
        truncated=truncated,
    )
