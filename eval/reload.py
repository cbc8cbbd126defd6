"""Reload check: does transformers read the artifact back to the same logits as dsq?

transformers loads compressed-tensors checkpoints (with the ``compressed-tensors`` package)
and dequantizes them; the check runs a fixed probe through both and reports the largest
absolute logit difference. Known gaps in transformers' reader are reported, not hidden.
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
class ReloadCheck:
    """Outcome of reading an artifact back with transformers.

    Attributes:
        loaded: transformers read the artifact (and, for asymmetric fused experts, with their zero points).
        max_abs_diff: Largest absolute logit difference on the probe (``None`` when not loaded).
        tolerance: The largest difference that passes.
        reason: Why it was not loaded (``None`` when it was).
    """

    loaded: bool
    max_abs_diff: float | None
    tolerance: float
    reason: str | None = None

    @property
    def passed(self) -> bool:
        return self.loaded and self.max_abs_diff is not None and self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict:
        """A report row's ``extra["reload_check"]``: loaded, max_abs_logit_diff, tolerance, passed, reason."""
        return {"loaded": self.loaded, "max_abs_logit_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "passed": self.passed, "reason": self.reason}


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
    """
    ids = probe_ids(model.config.vocab_size)
    expected = logits_of(model, ids)
    try:
        reloaded = _quiet_load(artifact, dtype, trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - reported to the user, never swallowed silently
        reason = _failure_reason(exc, model)
        logging.getLogger(__name__).warning("transformers could not reload %s: %s", artifact, reason)
        return ReloadCheck(False, None, tolerance, reason)
    got = logits_of(reloaded, ids)
    diff = float((got - expected).abs().max())
    experts = asymmetric_experts(model)
    if diff > tolerance and experts:
        loaded_without = f"transformers loaded the experts without their zero points: logits differ by {diff:.3g}"
        reason = f"{_expert_gap(experts)} ({loaded_without})"
        logging.getLogger(__name__).warning("transformers could not reload %s: %s", artifact, reason)
        return ReloadCheck(False, diff, tolerance, reason)
    return ReloadCheck(True, diff, tolerance)
