"""Numerical validation of an export: ONNX Runtime against dsq's PyTorch forward of the same model.

Three checks, each at several shapes:

* prefill: logits of ``[batch, seq]`` prompts with an empty cache (one batch left-padded);
* decode: a prompt, then single-token steps, each side carrying its own cache;
* greedy: 32 greedy tokens from both sides, which must be identical.

An export whose max |delta logit| exceeds the tolerance, or whose greedy tokens differ, fails. One
exception, recorded in the report: where the sequences first differ, PyTorch's own two best logits
are within the tolerance of each other (a tie that an allowed logit difference may break either way).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .decoder import CacheLayout, FlatDecoder, empty_past
from .runtime import OrtCausalLM, position_ids_from_mask

FP_TOLERANCE = 1e-4
QUANTIZED_TOLERANCE = 1e-3
# Graphs that quantize activations at run time (W8A8) are exact per module (int8 x int8 is integer
# arithmetic, and the per-token rounding is reproduced op for op: tests/export check it bit for bit),
# but a 1-ulp upstream difference (ORT's RMSNorm, softmax) can move an activation across a rounding
# boundary; each such flip changes a layer output by one int8 step. End to end they are held to this
# looser bound and to identical greedy tokens.
ACTIVATION_QUANTIZED_TOLERANCE = 0.25


@dataclass(frozen=True)
class ValidationConfig:
    """Shapes and budgets of the export check.

    Attributes:
        batch_sizes / seq_lens: every prefill shape ``(batch, seq)`` is checked.
        decode_steps: cached single-token steps after a prompt of ``decode_prompt`` tokens.
        greedy_tokens: greedy continuation length that must match token for token.
        tolerance: max |delta logit| allowed (``None``: 1e-4 for fp graphs, 1e-3 for quantized).
        seed: seed of the random prompts.
    """

    batch_sizes: tuple[int, ...] = (1, 3)
    seq_lens: tuple[int, ...] = (1, 17, 64)
    decode_prompt: int = 12
    decode_steps: int = 8
    greedy_tokens: int = 32
    tolerance: float | None = None
    seed: int = 0


@dataclass
class CaseResult:
    kind: str  # prefill | decode | greedy
    batch: int
    seq: int
    max_abs_diff: float
    tokens_equal: bool | None = None
    tie_margin: float | None = None  # PyTorch's top-1 minus top-2 logit where greedy tokens first differ


@dataclass
class ValidationReport:
    """Figures of one validation; ``passed`` when every case is within ``tolerance``."""

    tolerance: float
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.cases), default=0.0)

    @property
    def greedy_equal(self) -> bool:
        return all(c.tokens_equal for c in self.cases if c.tokens_equal is not None)

    def _greedy_ok(self, c: CaseResult) -> bool:
        return c.tokens_equal is not False or (c.tie_margin is not None and c.tie_margin <= self.tolerance)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and all(self._greedy_ok(c) for c in self.cases)

    def failures(self) -> list[str]:
        out = [f"{c.kind} batch {c.batch} x {c.seq}: max |delta logit| {c.max_abs_diff:.3g} > {self.tolerance:g}"
               for c in self.cases if c.max_abs_diff > self.tolerance]
        out += [f"greedy batch {c.batch}: the {c.seq} generated tokens differ from PyTorch's "
                f"(PyTorch's top-2 logit margin there {c.tie_margin:.3g})"
                for c in self.cases if not self._greedy_ok(c)]
        return out

    def to_dict(self) -> dict:
        return {
            "tolerance": self.tolerance, "max_abs_logit_diff": self.max_abs_diff,
            "greedy_tokens_equal": self.greedy_equal, "passed": self.passed,
            "greedy_tie_margins": [c.tie_margin for c in self.cases if c.tie_margin is not None],
            "cases": [asdict(c) for c in self.cases],
        }


class TorchCachedDecoder:
    """dsq's PyTorch forward driven like :class:`OrtCausalLM` (same inputs, same cache tensors)."""

    def __init__(self, model: nn.Module, layout: CacheLayout) -> None:
        self.decoder = FlatDecoder(model, layout).eval()
        self.layout = layout

    @torch.no_grad()
    def step(self, input_ids, attention_mask, past, position_ids=None):
        past_len = past[0].shape[2]
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, past_len)
        out = self.decoder(input_ids, attention_mask, position_ids, *past)
        return out[0].float(), list(out[1:])

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        return empty_past(self.layout, batch)


def _prompt(gen: torch.Generator, vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=gen)


def _left_pad_mask(batch: int, seq: int) -> torch.Tensor:
    """All ones except row 0, whose first ``seq // 3`` positions are padding (when batch > 1)."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1 and seq > 2:
        mask[0, : seq // 3] = 0
    return mask


def _diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    d = (a.float() - b.float()).abs()
    if mask is not None:
        d = d[mask.bool()]
    return float(d.max()) if d.numel() else 0.0


def _prefill_case(ort_lm, ref, ids, mask) -> float:
    o, _ = ort_lm.step(ids, mask, ort_lm.empty_past(ids.shape[0]))
    r, _ = ref.step(ids, mask, ref.empty_past(ids.shape[0]))
    return _diff(o, r, mask)


def _decode_case(ort_lm, ref, ids, steps: int) -> float:
    batch = ids.shape[0]
    mask = torch.ones_like(ids)
    o, o_past = ort_lm.step(ids, mask, ort_lm.empty_past(batch))
    r, r_past = ref.step(ids, mask, ref.empty_past(batch))
    worst = _diff(o, r)
    nxt = r[:, -1].argmax(-1, keepdim=True)  # both sides get the same next token
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        o, o_past = ort_lm.step(nxt, mask, o_past)
        r, r_past = ref.step(nxt, mask, r_past)
        worst = max(worst, _diff(o, r))
        nxt = r[:, -1].argmax(-1, keepdim=True)
    return worst


def _greedy(lm, ids: torch.Tensor, tokens: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy tokens ``[1, tokens]`` and the last-position logits each was chosen from."""
    mask = torch.ones_like(ids)
    logits, past = lm.step(ids, mask, lm.empty_past(ids.shape[0]))
    out, chosen_from = [], []
    for _ in range(tokens):
        chosen_from.append(logits[0, -1])
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        logits, past = lm.step(nxt, mask, past)
    return torch.cat(out, dim=1), chosen_from


def _greedy_case(ort_lm, ref, ids: torch.Tensor, tokens: int) -> CaseResult:
    ort_tokens, _ = _greedy(ort_lm, ids, tokens)
    ref_tokens, ref_logits = _greedy(ref, ids, tokens)
    if torch.equal(ort_tokens, ref_tokens):
        return CaseResult("greedy", 1, tokens, 0.0, tokens_equal=True)
    first = int((ort_tokens[0] != ref_tokens[0]).nonzero()[0])
    top2 = torch.topk(ref_logits[first].float(), 2).values
    return CaseResult("greedy", 1, tokens, 0.0, tokens_equal=False, tie_margin=float(top2[0] - top2[1]))


def validate_export(ort_lm: OrtCausalLM, model: nn.Module, layout: CacheLayout, vocab: int,
                    config: ValidationConfig, tolerance: float) -> ValidationReport:
    """Compare the ORT session with ``model`` (dsq's torch forward) on prefill, decode and greedy.

    Returns:
        A :class:`ValidationReport`; the caller decides what a failure means (the export fails).
    """
    ref = TorchCachedDecoder(model, layout)
    gen = torch.Generator().manual_seed(config.seed)
    report = ValidationReport(tolerance=tolerance)
    for batch in config.batch_sizes:
        for seq in config.seq_lens:
            ids = _prompt(gen, vocab, batch, seq)
            diff = _prefill_case(ort_lm, ref, ids, _left_pad_mask(batch, seq))
            report.cases.append(CaseResult("prefill", batch, seq, diff))
        ids = _prompt(gen, vocab, batch, config.decode_prompt)
        report.cases.append(CaseResult("decode", batch, config.decode_steps, _decode_case(ort_lm, ref, ids, config.decode_steps)))
    ids = _prompt(gen, vocab, 1, config.decode_prompt)
    report.cases.append(_greedy_case(ort_lm, ref, ids, config.greedy_tokens))
    return report

