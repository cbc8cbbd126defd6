"""Balance mappings: where a per-channel scale can move between an op and the layers that read it.

AWQ (Lin et al., 2024, arXiv:2306.00978) and SmoothQuant (Xiao et al., 2023, arXiv:2211.10438)
both rescale input channel ``j`` of some Linears by ``s_j`` and fold ``1/s_j`` into the op that
produces those channels, which leaves the full-precision function unchanged. This module is
the one place that says, per architecture, which ops may do that. Names are relative to a
decoder layer.

=============================  ===============================================  ======================
smooth (divided by s)           balance (input columns multiplied by s)          compensated (kept fp)
=============================  ===============================================  ======================
input_layernorm                 self_attn.q_a_proj, kv_a_proj_with_mqa,          (DeepSeek-V3.2: the DSA
                                indexer.wk, indexer.weights_proj                 indexer reads it too)
self_attn.q_a_layernorm         self_attn.q_b_proj, self_attn.indexer.wq_b       (DeepSeek-V3.2)
input_layernorm                 self_attn.q_a_proj, kv_proj, compressor.kv_proj, (DeepSeek-V4 CSA layers)
                                compressor.gate_proj, compressor.indexer.kv_proj,
                                .indexer.gate_proj, .indexer.scorer.weights_proj
input_layernorm                 self_attn.q_a_proj, kv_proj, compressor.kv_proj,  (DeepSeek-V4 HCA layers)
                                compressor.gate_proj
input_layernorm                 self_attn.q_a_proj, self_attn.kv_proj            (DeepSeek-V4 sliding layers)
self_attn.q_a_norm              self_attn.q_b_proj, compressor.indexer.q_b_proj  (DeepSeek-V4 CSA layers)
self_attn.q_a_norm              self_attn.q_b_proj                               (DeepSeek-V4 other layers)
self_attn.o_a_proj (rows)       self_attn.o_b_proj                               (DeepSeek-V4 grouped output)
input_layernorm                 self_attn.q_a_proj, self_attn.kv_a_proj_with_mqa  (MLA, DeepSeek-V3/V2)
input_layernorm                 self_attn.q_proj, self_attn.kv_a_proj_with_mqa    (MLA without q LoRA, V2-Lite)
self_attn.q_a_layernorm         self_attn.q_b_proj                               (MLA)
self_attn.kv_a_layernorm        self_attn.kv_b_proj                              (MLA)
input_layernorm                 self_attn.q_proj, k_proj, v_proj                 (Llama, Qwen2)
self_attn.v_proj (rows)         self_attn.o_proj                                 (Llama, Qwen2; only without GQA)
post_attention_layernorm        mlp.gate_proj, mlp.up_proj                       (dense MLPs)
mlp.up_proj (rows)              mlp.down_proj                                    (dense MLPs)
post_attention_layernorm        mlp.shared_experts.gate_proj, .up_proj,          mlp.gate (the router)
                                mlp.experts (every expert's gate_up_proj)
mlp.shared_experts.up_proj      mlp.shared_experts.down_proj                     (shared experts)
mlp.experts (up rows, e)        mlp.experts (down_proj columns of expert e)      (routed experts, per expert)
=============================  ===============================================  ======================

Rows are tried in order and a smooth op takes the first row whose modules all exist, so the rows that
name more readers of the same op (V3.2's indexer, V4's compressors) come first.

Not balanced: MLA's ``o_proj`` (its input is the attention-weighted value part of ``kv_b_proj``,
interleaved per head with the no-rope key part) and Llama/Qwen2 ``o_proj`` under grouped-query
attention; those layers are quantized without a balance scale. DeepSeek-V4: ``o_a_proj`` (its input
is the attention output, rotated back by RoPE on each head's rope slice: no foldable op), and the
``up -> down`` rows of its shared and routed experts: V4 clamps ``up`` to ``[-swiglu_limit, swiglu_limit]``
before the product, so ``clamp(up / s) * s`` is not ``clamp(up)`` and the fold would change the model;
:func:`unbalanced` names them and the methods report it. The residual stream between blocks is mixed by
hyper-connections (``attn_hc``, ``ffn_hc``), not a Linear, so nothing folds across blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .modules import is_fused_experts


@dataclass(frozen=True)
class Balance:
    """One balance mapping (names relative to a decoder layer).

    Attributes:
        smooth: the op whose output channels are divided by ``s`` (a norm, a Linear's rows, or the
            up half of every expert's ``gate_up_proj`` when ``per_expert``).
        balance: the quantized layers whose input columns are multiplied by ``s``.
        compensate: high-precision readers of the same channels, multiplied by ``s`` too (router).
        per_expert: one scale vector per routed expert (experts' up rows -> down columns).
        through_activation: the scale passes through the gated activation's ``up`` input (``up`` rows ->
            ``down`` columns); invalid where the activation clamps ``up`` (DeepSeek-V4's ``swiglu_limit``).
    """

    smooth: str
    balance: tuple[str, ...]
    compensate: tuple[str, ...] = ()
    per_expert: bool = False
    through_activation: bool = False


_V4_CSA_READERS = ("self_attn.compressor.kv_proj", "self_attn.compressor.gate_proj", "self_attn.compressor.indexer.kv_proj",
                   "self_attn.compressor.indexer.gate_proj", "self_attn.compressor.indexer.scorer.weights_proj")

MAPPINGS: tuple[Balance, ...] = (
    Balance("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.indexer.wk",
                                "self_attn.indexer.weights_proj")),
    Balance("self_attn.q_a_layernorm", ("self_attn.q_b_proj", "self_attn.indexer.wq_b")),
    Balance("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_proj", *_V4_CSA_READERS)),
    Balance("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_proj", *_V4_CSA_READERS[:2])),
    Balance("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_proj")),
    Balance("self_attn.q_a_norm", ("self_attn.q_b_proj", "self_attn.compressor.indexer.q_b_proj")),
    Balance("self_attn.q_a_norm", ("self_attn.q_b_proj",)),
    Balance("self_attn.o_a_proj", ("self_attn.o_b_proj",)),
    Balance("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")),
    Balance("input_layernorm", ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")),
    Balance("self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
    Balance("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",)),
    Balance("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Balance("self_attn.v_proj", ("self_attn.o_proj",)),
    Balance("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Balance("mlp.up_proj", ("mlp.down_proj",), through_activation=True),
    Balance(
        "post_attention_layernorm",
        ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.experts"),
        compensate=("mlp.gate",),
    ),
    Balance("mlp.shared_experts.up_proj", ("mlp.shared_experts.down_proj",), through_activation=True),
    Balance("mlp.experts", ("mlp.experts",), per_expert=True, through_activation=True),
)


def find(layer: nn.Module, name: str) -> nn.Module | None:
    """Submodule ``name`` of ``layer``, or None."""
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


def _channels_match(layer: nn.Module, m: Balance) -> bool:
    """A Linear smooth op must produce exactly the channels its balance layers read."""
    smooth = find(layer, m.smooth)
    if isinstance(smooth, nn.Linear):
        return all(
            isinstance(b := find(layer, name), nn.Linear) and b.in_features == smooth.out_features for name in m.balance
        )
    return True


def _clamped(layer: nn.Module, m: Balance) -> bool:
    """The gated activation between ``m``'s smooth op and its balance layers clamps ``up`` (DeepSeek-V4)."""
    if not m.through_activation:
        return False
    owner = find(layer, m.smooth if m.per_expert else m.smooth.rpartition(".")[0])
    return getattr(owner, "limit", None) is not None


def _candidates(layer: nn.Module) -> list[Balance]:
    """Rows whose modules exist in ``layer`` and line up, first row per smooth op."""
    found: list[Balance] = []
    smooth_taken: set[str] = set()
    for m in MAPPINGS:
        names = (m.smooth, *m.balance, *m.compensate)
        if any(find(layer, n) is None for n in names) or (m.smooth in smooth_taken and not m.per_expert):
            continue
        if m.per_expert and not is_fused_experts(find(layer, m.smooth)):
            continue
        if not _channels_match(layer, m):
            continue
        found.append(m)
        smooth_taken.add(m.smooth)
    return found


def resolve(layer: nn.Module) -> list[Balance]:
    """The mappings that apply to ``layer``: every named module exists (and channels line up).

    An ``input_layernorm`` or ``post_attention_layernorm`` may appear in several table rows
    (one per architecture); at most one of them resolves for a given layer. Rows through a clamping
    activation are left out (:func:`unbalanced`).
    """
    return [m for m in _candidates(layer) if not _clamped(layer, m)]


def unbalanced(layer: nn.Module) -> list[tuple[Balance, str]]:
    """Rows of the table that exist in ``layer`` but cannot fold exactly, with the reason."""
    return [(m, "the gated activation clamps up (swiglu_limit), so the fold would change the model")
            for m in _candidates(layer) if _clamped(layer, m)]


NO_FOLDABLE_OP = "no foldable op produces its input"


def without_balance(prefix: str, layer: nn.Module, quantized: set[str]) -> dict[str, str]:
    """Quantized inputs of ``layer`` (full name ``prefix``) that no resolved row balances, with the reason.

    Keys are module names (a fused experts module's ``gate_up_proj`` and ``down_proj`` separately).
    """
    rows, skipped = resolve(layer), unbalanced(layer)
    covered = {b for m in rows if not m.per_expert for b in m.balance}
    covered_down = {m.smooth for m in rows if m.per_expert}
    clamped = {name: reason for m, reason in skipped for name in ((m.smooth,) if m.per_expert else m.balance)}
    out: dict[str, str] = {}
    for name in sorted(quantized):
        if not name.startswith(prefix + "."):
            continue
        rel = name[len(prefix) + 1:]
        if is_fused_experts(find(layer, rel)):
            if rel not in covered:
                out[f"{name}.gate_up_proj"] = NO_FOLDABLE_OP
            if rel not in covered_down:
                out[f"{name}.down_proj"] = clamped.get(rel, NO_FOLDABLE_OP)
        elif rel not in covered:
            out[name] = clamped.get(rel, NO_FOLDABLE_OP)
    return out


def without_balance_notes(method: str, missing: dict[str, str], layers_prefix: str) -> list[str]:
    """One report line per (module within a layer, reason): which layers' modules got no balance scale."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for name, reason in missing.items():
        layer, _, rel = name.removeprefix(layers_prefix + ".").partition(".")
        grouped.setdefault((rel, reason), []).append(layer)
    return [f"{method}: {rel} of {len(layers)} layer(s) quantized without a balance scale ({reason})"
            for (rel, reason), layers in grouped.items()]


# ----------------------------------------------------------------------------- folding


@torch.no_grad()
def _rescale(t: torch.Tensor, factor: torch.Tensor, *, divide: bool) -> None:
    """``t /= factor`` or ``t *= factor`` computed in fp32 and written back in ``t``'s dtype (bf16 safe)."""
    factor = factor.to(device=t.device, dtype=torch.float32)
    t.copy_((t.float() / factor if divide else t.float() * factor).to(t.dtype))


def divide_smooth(module: nn.Module, s: torch.Tensor, *, per_expert: bool) -> None:
    """Divide the output channels of the smooth op by ``s`` (``[C]``, or ``[E, I]`` per expert)."""
    if per_expert:  # up half of every expert's gate_up_proj: rows I..2I
        inter = module.down_proj.shape[-1]
        _rescale(module.gate_up_proj[:, inter:, :], s.unsqueeze(-1), divide=True)
    elif isinstance(module, nn.Linear):
        _rescale(module.weight, s.unsqueeze(1), divide=True)
        if module.bias is not None:
            _rescale(module.bias, s, divide=True)
    else:  # a norm: y = w * normalize(x)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != s.shape[-1]:
            raise ValueError(f"cannot fold a scale of {tuple(s.shape)} into {type(module).__name__}")
        _rescale(weight, s, divide=True)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            _rescale(bias, s, divide=True)


def multiply_consumer(module: nn.Module, s: torch.Tensor, *, per_expert: bool) -> None:
    """Multiply the input columns of a reader of the smoothed channels by ``s``."""
    if per_expert:  # down_proj [E, H, I] of each expert by its own s [E, I]
        _rescale(module.down_proj, s.unsqueeze(1), divide=False)
    else:  # fused gate_up_proj [E, 2I, H], a Linear's or the router's weight [out, C]
        _rescale(balance_weight(module), s, divide=False)


def balance_weight(module: nn.Module) -> torch.Tensor:
    """The weight whose input columns a balance scale multiplies: fused experts' ``gate_up_proj``, else ``weight``."""
    return module.gate_up_proj if is_fused_experts(module) else module.weight


def input_key(prefix: str, m: Balance) -> str:
    """Statistics key of the smoothed channels: the first balance layer's input."""
    first = f"{prefix}.{m.balance[0]}"
    return f"{first}.gate_up_proj" if first.endswith("experts") else first


def fold(layer: nn.Module, m: Balance, s: torch.Tensor) -> None:
    """Apply scale ``s`` to mapping ``m`` of ``layer``; the full-precision function is unchanged."""
    divide_smooth(layer.get_submodule(m.smooth), s, per_expert=m.per_expert)
    for name in (*m.balance, *m.compensate):
        multiply_consumer(layer.get_submodule(name), s, per_expert=m.per_expert)
