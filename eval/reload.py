"""Reload check: does transformers read the artifact back to the same logits as dsq?

transformers loads compressed-tensors checkpoints (with the ``compressed-tensors`` package)
and dequantizes them; the check runs a fixed probe through both and reports the largest
absolute logit difference. Known gaps in transformers' reader are reported, not hidden.

An artifact with a quantized KV cache (``kv_cache_scheme``): when transformers builds no KV-cache
quantization from it (transformers 5.25 with compressed-tensors 0.20.1 do not: compressed-tensors recognises
cached attention by a ``past_key_value(s)`` forward argument, transformers 5.25 names it ``cache``, and the
``k_scale`` / ``v_scale`` tensors are dropped as unexpected), the logits are compared with dsq's KV-cache
quantization switched off and :class:`KVCacheReload` says so. The scales are compared either way: the ones
transformers loaded, or, when it loaded none, the ones in the artifact's files; a difference fails the check.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

TOLERANCE = 1e-4


@dataclass(frozen=True)
class KVCacheReload:
    """What transformers did with an artifact's quantized KV cache.

    Attributes:
        scheme: the artifact's KV-cache scheme, described.
        applied: transformers quantizes the KV cache (every attention carries its scales and compressed-tensors' cache hook).
        scales_from: where the scales compared with dsq's came from (transformers' modules, or the artifact's files).
        note: one sentence for the report.
    """

    scheme: str
    applied: bool
    scales_from: str
    note: str

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "applied_by_transformers": self.applied, "scales_compared_from": self.scales_from,
                "scales_equal": True, "note": self.note}


@dataclass(frozen=True)
class ReloadCheck:
    """Outcome of reading an artifact back with transformers.

    Attributes:
        loaded: transformers read the artifact (and, for asymmetric fused experts, with their zero points).
        max_abs_diff: Largest absolute logit difference on the probe (``None`` when not loaded).
        tolerance: The largest difference that passes.
        reason: Why it was not loaded (``None`` when it was).
        kv_cache: What transformers did with a quantized KV cache (``None``: the artifact has none).
    """

    loaded: bool
    max_abs_diff: float | None
    tolerance: float
    reason: str | None = None
    kv_cache: KVCacheReload | None = None

    @property
    def passed(self) -> bool:
        return self.loaded and self.max_abs_diff is not None and self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict:
        """A report row's ``extra["reload_check"]``: loaded, max_abs_logit_diff, tolerance, passed, reason."""
        out = {"loaded": self.loaded, "max_abs_logit_diff": self.max_abs_diff, "tolerance": self.tolerance,
               "passed": self.passed, "reason": self.reason}
        if self.kv_cache is not None:
            out["kv_cache"] = self.kv_cache.to_dict()
        return out


def probe_ids(vocab_size: int, batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    """The fixed probe, ``(batch, seq)`` token ids drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=g)


@torch.inference_mode()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``model``'s float32 logits on ``ids``, on the CPU: ``(batch, seq, vocab)``."""
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits.float().cpu()


def _quiet_load(path: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    # compressed-tensors warns about expert targets that transformers fuses before matching
    ct_log = logging.getLogger("compressed_tensors")
    ct_level = ct_log.level
    ct_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
            ).eval()
    finally:
        hf_logging.set_verbosity(previous)
        ct_log.setLevel(ct_level)


# transformers' compressed-tensors reader of fused MoE experts (CompressedTensorsDequantize, 5.24 and 5.25)
# decompresses each expert from its weight_packed, weight_scale and weight_shape only: it never collects
# weight_zero_point, so asymmetric experts fail to load (upstream fix: transformers pull request 47430).
EXPERT_ZERO_POINT_GAP = (
    "transformers {transformers} (compressed-tensors {compressed_tensors}) cannot read asymmetric quantized "
    "fused MoE experts: its expert loader does not collect weight_zero_point (upstream fix: transformers "
    "pull request 47430); asymmetric experts: {modules}. dsq.quantize.artifact_load reads them exactly"
)


def asymmetric_experts(model: nn.Module) -> list[str]:
    """Names of the quantized fused-expert modules of ``model`` whose scheme has zero points."""
    from dsq.quantize.modules import QuantExperts

    return [name for name, m in model.named_modules()
            if isinstance(m, QuantExperts) and not (m.gate_up_proj.scheme.symmetric and m.down_proj.scheme.symmetric)]


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for dist in ("transformers", "compressed-tensors"):
        try:
            found[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist.replace("-", "_")] = "not installed"
    return found


def _expert_gap(experts: list[str]) -> str:
    shown = ", ".join(experts[:4]) + (f" and {len(experts) - 4} more" if len(experts) > 4 else "")
    return EXPERT_ZERO_POINT_GAP.format(modules=shown, **_versions())


def _failure_reason(exc: Exception, model: nn.Module) -> str:
    """What to report when transformers cannot load the artifact: the known gap when it applies."""
    message = str(exc).strip()
    raised = f"{type(exc).__name__}: {message.splitlines()[0] if message else type(exc).__name__}"
    experts = asymmetric_experts(model)
    return f"{_expert_gap(experts)} (transformers raised {raised})" if experts else raised


def transformers_reload_check(
    artifact: Path, model: nn.Module, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
    tolerance: float = TOLERANCE,
) -> ReloadCheck:
    """Load ``artifact`` with transformers and compare its logits with ``model``'s.

    Args:
        artifact: The saved artifact directory.
        model: The model it was saved from (dsq's modules), the reference.
        dtype: dtype transformers loads the artifact in.
        trust_remote_code: Passed to ``from_pretrained``.
        tolerance: The largest absolute logit difference that passes.

    Returns:
        A :class:`ReloadCheck`; ``loaded=False`` with the reason when transformers cannot read it.
        Asymmetric fused experts that transformers fails to load, or loads without their zero points
        (the ``block`` strategy of a ragged last group: logits beyond ``tolerance``), give
        ``loaded=False`` with the known gap in transformers' expert loader and the modules named.
        A model with a quantized KV cache gets :attr:`ReloadCheck.kv_cache` (see :func:`kv_cache_reload`); the
        reference logits are dsq's with that quantization switched off when transformers does not apply it.

    Raises:
        QuantizationError: the KV-cache scales transformers loaded, or the artifact holds, differ from dsq's.
    """
    from dsq.quantize.kv_cache import kv_cache_quantization_off, kv_cache_scheme_of

    ids = probe_ids(model.config.vocab_size)
    expected = logits_of(model, ids)
    try:
        reloaded = _quiet_load(artifact, dtype, trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - reported to the user, never swallowed silently
        reason = _failure_reason(exc, model)
        logging.getLogger(__name__).warning("transformers could not reload %s: %s", artifact, reason)
        return ReloadCheck(False, None, tolerance, reason)
    kv = None
    if kv_cache_scheme_of(model) is not None:
        kv = kv_cache_reload(artifact, model, reloaded)
        if not kv.applied:
            with kv_cache_quantization_off(model):
                expected = logits_of(model, ids)
    got = logits_of(reloaded, ids)
    diff = float((got - expected).abs().max())
    experts = asymmetric_experts(model)
    if diff > tolerance and experts:
        loaded_without = f"transformers loaded the experts without their zero points: logits differ by {diff:.3g}"
        reason = f"{_expert_gap(experts)} ({loaded_without})"
        logging.getLogger(__name__).warning("transformers could not reload %s: %s", artifact, reason)
        return ReloadCheck(False, diff, tolerance, reason, kv)
    return ReloadCheck(True, diff, tolerance, kv_cache=kv)


KV_CACHE_ATTR = "kv_cache"
"""The submodule compressed-tensors gives an attention whose KV cache it quantizes (``QuantizedKVCache``)."""


def _stored_scales(artifact: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` as the artifact's weight files hold them (absent names left out)."""
    from safetensors import safe_open

    from dsq.core.checkpoint import inspect_checkpoint

    found: dict[str, torch.Tensor] = {}
    for path in inspect_checkpoint(artifact).weight_files:
        with safe_open(str(path), framework="pt") as f:
            stored = set(f.keys())
            found |= {n: f.get_tensor(n) for n in names if n in stored}
    return found


def kv_cache_reload(artifact: Path, model: nn.Module, reloaded: nn.Module) -> KVCacheReload:
    """What transformers did with ``model``'s quantized KV cache, its scales checked against dsq's.

    Args:
        artifact: the saved artifact.
        model: dsq's model (with KV-cache quantization).
        reloaded: transformers' model of the artifact.

    Returns:
        The :class:`KVCacheReload`.

    Raises:
        QuantizationError: a ``k_scale`` / ``v_scale`` that transformers loaded, or that the artifact holds,
            differs from dsq's, or is missing from the artifact (named).
    """
    from dsq.core.errors import QuantizationError
    from dsq.quantize.kv_cache import kv_cache_scheme_of, kv_scales_of

    ours = kv_scales_of(model)
    modules = dict(reloaded.named_modules())
    owners = {name: modules.get(name.rpartition(".")[0]) for name in ours}
    loaded = {name: getattr(m, name.rpartition(".")[2], None) for name, m in owners.items()}
    have = all(isinstance(t, torch.Tensor) for t in loaded.values())
    applied = have and all(hasattr(m, KV_CACHE_ATTR) for m in owners.values())
    if have:
        theirs, source = {n: t.detach() for n, t in loaded.items()}, "transformers' attention modules"
    else:
        theirs, source = _stored_scales(artifact, list(ours)), "the artifact's weight files (transformers loaded none)"
    for name, value in ours.items():
        other = theirs.get(name)
        if other is None:
            raise QuantizationError(f"{artifact}: tensor {name} is missing from the artifact")
        if other.numel() != value.numel() or not torch.equal(other.float().cpu().reshape(value.shape), value.float().cpu()):
            raise QuantizationError(f"{artifact}: {name} in {source} is {other.flatten().tolist()[:8]}, dsq's model has "
                                    f"{value.flatten().tolist()[:8]}")
    scheme = kv_cache_scheme_of(model).describe()
    v = _versions()
    if applied:
        note = (f"transformers {v['transformers']} (compressed-tensors {v['compressed_tensors']}) quantizes the KV cache; "
                "logits compared with dsq's quantized KV cache")
    else:
        note = (f"transformers {v['transformers']} (compressed-tensors {v['compressed_tensors']}) did not apply the "
                f"artifact's kv_cache_scheme ({scheme}): its attention modules run an unquantized cache"
                + ("" if have else " and k_scale/v_scale were not loaded")
                + "; logits compared with dsq's KV-cache quantization switched off")
    return KVCacheReload(scheme, applied, source, note + f"; k_scale/v_scale from {source} equal dsq's")
