"""bitsandbytes backends: ``bnb-nf4``, ``bnb-fp4`` and ``bnb-int8`` (LLM.int8).

:func:`quantize_bnb_` swaps the selected ``nn.Linear`` modules of a model for bitsandbytes'
``Linear4bit`` / ``Linear8bitLt`` in place (on the model's current device, CPU or CUDA) and marks
the model the way transformers marks a model it loaded with a ``BitsAndBytesConfig``, so that
:func:`save_bnb_model` writes a pre-quantized bitsandbytes checkpoint (safetensors only) that
``AutoModelForCausalLM.from_pretrained(dir)`` reads back to the same modules and the same logits.
bitsandbytes is imported lazily; without it every entry point raises :class:`BnbUnavailableError`.

Example:
    >>> report = quantize_bnb_(model, BnbNF4Config(blocksize=64))
    >>> save_bnb_model(model, tokenizer, Path("out/nf4"))
    >>> reloaded = AutoModelForCausalLM.from_pretrained("out/nf4", local_files_only=True)

Traps handled (checked with bitsandbytes 0.50.2 and transformers 5.23-5.25, on AVX2 and AVX512-BF16 CPUs):

* Fused MoE experts. transformers 5 holds DeepSeek's routed experts as 3-D parameters
  (``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]). Its bitsandbytes integration
  (``replace_with_bnb_linear``) converts only modules whose type is exactly ``nn.Linear`` (or GPT-2's
  ``Conv1D``), so even ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` leaves
  the experts in the load dtype, and a pre-quantized checkpoint has no way to carry them quantized;
  bitsandbytes itself has no 3-D/grouped expert layer. The experts are kept in their dtype and listed
  in the report's kept modules with that reason, never skipped silently.
* The skip list. transformers adds its default skips (the output embedding) only when
  ``llm_int8_skip_modules`` is None, and converts every other plain ``nn.Linear`` on reload. The
  config therefore always lists every kept module by name, and only exact ``nn.Linear`` modules
  (not subclasses, not the model's ``_keep_in_fp32_modules``) are quantized, so the reloaded model
  has exactly the quantized modules the in-memory one has.
* CPU 4-bit AVX512-BF16 path. Where bitsandbytes detects AVX512-BF16 (:func:`cpu_bf16_kernel_detected`;
  AVX2-only CPUs do not have it), ``Linear4bit`` repacks its weight in the first eval forward without
  grad for a kernel that computes in bf16 whatever ``compute_dtype`` says (outputs differ from the
  dequantized weight's matmul by ~2^-8 of sum |x||w|; the dequantize path elsewhere is exact). The
  repack needs out_features % 32 == 0 and in_features % 64 == 0 (and whole blocks per row): other
  shapes fail in it (``N must be divisible by block_n``). The per-module switch
  (``support_avx512bf16_for_cpu``) does not survive a transformers reload, which builds every
  ``Linear4bit`` with the detected default, so such modules are kept in their dtype (with that
  reason) and a checkpoint works on every host; real DeepSeek/Llama/Qwen2 shapes all conform.
  Quantized modules keep bitsandbytes' default, exactly as a reloaded model has it. The repacked
  layout has three traps (bitsandbytes 0.50.2): ``state_dict()`` after it writes a transposed
  bfloat16 ``absmax`` for plain (not double-quantized) weights and leaves the module computing with
  scrambled scales; training forwards keep using the packed kernel, which has no backward (no
  gradient reaches the layer's input); ``dequantize_4bit`` of the packed data is garbage. Hence
  :func:`restore_standard_layout_` (called by :func:`save_bnb_model`), :func:`set_cpu_bf16_kernel_`
  (LoRA turns the kernel off on its base) and :func:`dequantized_4bit_weight`. The repack rounds
  absmax to bfloat16 and drops double quantization (bitsandbytes re-quantizes it on the way back), so
  a save after an eval forward writes the scales the model computed with, not the original ones.
* LLM.int8 and inputs with more than 3 dims. ``Linear8bitLt`` in eval mode fails on 4-D inputs
  (CPU: a broadcast error in the int8 row quantizer; CUDA: ``Only two or three dimensional
  matrices are supported``). transformers 5.23's DeepSeek-V2/V3 attention feeds ``kv_b_proj`` a
  [batch, 1, seq, kv_lora_rank] tensor in every forward, so transformers' own ``load_in_8bit`` of
  DeepSeek-V3 crashes. A wrapper would fix the in-memory forward only (a reload builds plain
  ``Linear8bitLt``), so for ``bnb-int8`` the modules listed in :data:`INT8_ND_INPUT_PATTERNS` are
  kept in their dtype, with that reason. 4-bit layers handle any number of dims.
* LLM.int8 casts weights (and activations) to float16 before its per-row absmax quantization,
  like transformers' own path; float32 weights beyond the float16 range would overflow. They are
  checked and refused with the tensor's name.
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from dsq.core.errors import DsqInputError, QuantizationError

from .api import ModuleRecord, QuantizationReport, start_report, tensor_bytes
from .modules import set_module
from .targets import TargetDecision, TargetSpec, select_targets

COMPUTE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
"""4-bit compute dtypes accepted (float16 is refused: DeepSeek activations overflow it)."""

BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""4-bit block sizes bitsandbytes 0.50 accepts."""

INT8_ND_INPUT_PATTERNS: tuple[str, ...] = (r"(^|\.)kv_b_proj$",)
"""Linears that receive inputs with more than 3 dims (DeepSeek MLA's ``kv_b_proj`` gets
[batch, 1, seq, kv_lora_rank]); ``Linear8bitLt`` cannot run them, so ``bnb-int8`` keeps them."""

CPU_KERNEL_OUT_MULTIPLE = 32
CPU_KERNEL_IN_MULTIPLE = 64

FP16_MAX = 65504.0


class BnbUnavailableError(DsqInputError, ImportError):
    """bitsandbytes (or its native library) cannot be imported."""


@dataclass(frozen=True)
class _Bnb4bitConfig:
    """4-bit weight-only quantization with bitsandbytes' ``Linear4bit``.

    Args:
        targets: which modules to quantize (router and lm_head are kept by default).
        compute_dtype: dtype of the matmul: ``torch.float32`` or ``torch.bfloat16``.
        double_quant: also quantize the per-block absmax values (8-bit, blocks of 256).
        blocksize: weights per absmax block, one of :data:`BLOCKSIZES`.
    """

    targets: TargetSpec = TargetSpec()
    compute_dtype: torch.dtype = torch.float32
    double_quant: bool = False
    blocksize: int = 64

    quant_type = ""

    def __post_init__(self) -> None:
        _check_4bit(self)

    def describe(self) -> str:
        return _describe_4bit(self)


@dataclass(frozen=True)
class BnbNF4Config(_Bnb4bitConfig):
    """4-bit NormalFloat (QLoRA, Dettmers et al. 2023); fields as :class:`_Bnb4bitConfig`."""

    quant_type = "nf4"


@dataclass(frozen=True)
class BnbFP4Config(_Bnb4bitConfig):
    """4-bit float (e2m1); fields as :class:`_Bnb4bitConfig`."""

    quant_type = "fp4"


@dataclass(frozen=True)
class BnbInt8Config:
    """LLM.int8 (Dettmers et al. 2022) with bitsandbytes' ``Linear8bitLt``.

    Weights are int8 with one absmax scale per output row; at run time activation columns with
    any value above ``threshold`` are multiplied in float16, the rest in int8.

    Args:
        targets: which modules to quantize (router and lm_head are kept by default).
        threshold: LLM.int8 outlier threshold on activations (0 disables the decomposition).
    """

    targets: TargetSpec = TargetSpec()
    threshold: float = 6.0

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"threshold must be a number >= 0, got {self.threshold!r}")
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0, got {self.threshold!r}")

    def describe(self) -> str:
        return f"llm.int8 per-row int8, outlier threshold {float(self.threshold):g}"


Bnb4bitConfig = Union[BnbNF4Config, BnbFP4Config]
BnbConfig = Union[BnbNF4Config, BnbFP4Config, BnbInt8Config]



def _check_4bit(config: Bnb4bitConfig) -> None:
    if config.compute_dtype not in COMPUTE_DTYPES:
        allowed = ", ".join(str(d) for d in COMPUTE_DTYPES)
        raise ValueError(f"compute_dtype must be one of {allowed}; got {config.compute_dtype!r}")
    if isinstance(config.blocksize, bool) or config.blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}; got {config.blocksize!r}")
    if not isinstance(config.double_quant, bool):
        raise ValueError(f"double_quant must be True or False, got {config.double_quant!r}")


def _describe_4bit(config: Bnb4bitConfig) -> str:
    text = f"{config.quant_type} block {config.blocksize}"
    if config.double_quant:
        text += ", double quant"
    if config.compute_dtype != torch.float32:
        text += f", compute {str(config.compute_dtype).removeprefix('torch.')}"
    return text


def import_bnb() -> Any:
    """Import bitsandbytes, or raise :class:`BnbUnavailableError` saying how to install it."""
    try:
        import bitsandbytes
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a broken native library
        raise BnbUnavailableError(
            "the bnb-nf4 / bnb-fp4 / bnb-int8 methods need bitsandbytes>=0.45, which could not be imported "
            f"({type(exc).__name__}: {exc}); install it with `pip install 'dsq[bnb]'` or `pip install bitsandbytes`"
        ) from exc
    return bitsandbytes


def quantize_bnb_(model: nn.Module, config: BnbConfig, *, progress: bool = True) -> QuantizationReport:
    """Replace every selected ``nn.Linear`` of ``model`` with a bitsandbytes layer, in place.

    Weights are quantized on the device they are on. The model is then marked as transformers
    marks a bitsandbytes model (``config.quantization_config``, ``hf_quantizer``,
    ``is_loaded_in_4bit`` / ``is_loaded_in_8bit``) so that ``save_pretrained`` writes a
    pre-quantized checkpoint; the config's ``llm_int8_skip_modules`` lists every kept module.

    Args:
        model: a transformers causal LM (any ``nn.Module`` works for the swap itself).
        config: :class:`BnbNF4Config`, :class:`BnbFP4Config` or :class:`BnbInt8Config`.
        progress: show a progress bar.

    Returns:
        A :class:`QuantizationReport` (method ``bnb-nf4`` / ``bnb-fp4`` / ``bnb-int8``): every
        quantizable module with its bytes before and after (packed weight plus absmax / quant
        state / SCB, exactly what is saved), and every kept one with the reason.

    Raises:
        BnbUnavailableError: bitsandbytes cannot be imported.
        TypeError: ``config`` is not a bitsandbytes config.
        QuantizationError: the model is already quantized, a weight is on the meta device, or an
            int8 weight does not fit float16.

    Example:
        >>> report = quantize_bnb_(model, BnbInt8Config())
        >>> [(m.name, m.reason) for m in report.kept]
    """
    if not isinstance(config, (BnbNF4Config, BnbFP4Config, BnbInt8Config)):
        raise TypeError(f"quantize_bnb_ takes BnbNF4Config, BnbFP4Config or BnbInt8Config; got {type(config).__name__}")
    from .method import method_of

    method = method_of(config).name
    bnb = import_bnb()
    _refuse_quantized(model, bnb)

    decisions = select_targets(model, config.targets)
    report = start_report(model, decisions, method=method, scheme=config.describe())
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])

    skip: list[str] = []
    for d in tqdm(decisions, desc=f"quantize ({method})", disable=not progress, unit="module"):
        params = sum(p.numel() for p in d.module.parameters())
        before = tensor_bytes(d.module)
        reason = _keep_reason(d, config, keep_fp32)
        if reason is not None:
            skip.append(d.name)
            report.modules.append(ModuleRecord(d.name, d.kind, False, reason, params, before, before))
            continue
        new = _to_bnb_linear(bnb, d.name, d.module, config)
        set_module(model, d.name, new)
        report.modules.append(
            ModuleRecord(d.name, d.kind, True, d.reason, params, before, saved_bytes(new), config.describe())
        )
    _mark_as_transformers_bnb(model, config, skip)
    return report


def save_bnb_model(model: nn.Module, tokenizer: Any, root: Path) -> None:
    """Write a bitsandbytes model quantized by :func:`quantize_bnb_` as a transformers checkpoint.

    ``root`` receives ``config.json`` (with the ``BitsAndBytesConfig``), safetensors weights
    (packed 4-bit weights with their quant state, or int8 weights with ``SCB``; kept modules in
    their dtype; experts per expert as transformers saves them) and the tokenizer (if given).
    ``AutoModelForCausalLM.from_pretrained(root)`` loads it back. Layers an eval forward repacked for
    the CPU AVX512-BF16 kernel are put back into the standard layout first
    (:func:`restore_standard_layout_`), so the files hold what the model computes with.

    Args:
        model: a transformers model after :func:`quantize_bnb_`.
        tokenizer: its tokenizer, or None.
        root: directory to write (created if needed).

    Raises:
        BnbUnavailableError: bitsandbytes cannot be imported.
        QuantizationError: the model was not quantized with bitsandbytes, or the written directory
            holds pickle weights or no safetensors.
    """
    import_bnb()
    from transformers import PreTrainedModel
    from transformers.utils.quantization_config import QuantizationMethod

    from dsq.core.checkpoint import PICKLE_SUFFIXES

    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(model, PreTrainedModel) or quantizer is None or (
        quantizer.quantization_config.quant_method != QuantizationMethod.BITS_AND_BYTES
    ):
        raise QuantizationError(
            "save_bnb_model needs a transformers model quantized with quantize_bnb_ "
            f"(got {type(model).__name__} without a bitsandbytes quantizer)"
        )
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    restore_standard_layout_(model)  # bitsandbytes' own inverse would write a transposed absmax
    model.save_pretrained(root)
    if tokenizer is not None:
        tokenizer.save_pretrained(root)
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise QuantizationError(f"{root} holds pickle weight files {pickles}; only safetensors are allowed")
    if not any(p.suffix == ".safetensors" for p in root.iterdir()):
        raise QuantizationError(f"save_pretrained wrote no safetensors weights into {root}")


def saved_bytes(module: nn.Module) -> int:
    """Bytes of everything ``module`` saves: packed weight, absmax / quant state or SCB, bias."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))


def bnb_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` of a model."""
    bnb = import_bnb()
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def cpu_bf16_kernel_detected() -> bool:
    """Whether bitsandbytes detects AVX512-BF16 here, i.e. whether a new ``Linear4bit`` (and every one a
    transformers reload builds) computes its CPU eval forwards with the repacked bf16 kernel."""
    bnb = import_bnb()
    return bool(bnb.functional.has_avx512bf16())


def _linear4bit_layers(module: nn.Module) -> list[nn.Module]:
    bnb = sys.modules.get("bitsandbytes")  # never imported: no module can hold its layers
    if bnb is None:
        return []
    return [m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _is_repacked(weight: Any) -> bool:
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def _has_transposed_absmax(weight: Any) -> bool:
    """Left by bitsandbytes' own inverse (``state_dict()`` after a repack): the data is back in the
    standard layout, a plain absmax is still ``(in / blocksize, out)`` bfloat16."""
    state = getattr(weight, "quant_state", None)
    return state is not None and not _is_repacked(weight) and not state.nested and state.absmax.dim() == 2


def _unpack(data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """bitsandbytes' inverse of its CPU repack, completed: it transposes ``absmax`` back only for
    double-quantized weights, so plain ones get their ``(in / blocksize, out)`` bfloat16 absmax put back
    in row-block order, in float32 as ``quantize_4bit`` made it. ``state`` is modified."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    data, state = _convert_weight_packed_for_cpu_inverse(data, state)
    if not state.nested and state.absmax.dim() == 2:  # (in / blocksize, out) -> blocks in row order
        state.absmax = state.absmax.T.reshape(-1).float().contiguous()
    return data, state


def standard_4bit_state(weight: Any) -> tuple[torch.Tensor, Any]:
    """The packed 4-bit data and quant state of a ``Params4bit`` in bitsandbytes' standard layout.

    Copies are returned when the weight is in the CPU AVX512-BF16 kernel's repacked layout (or its
    plain absmax was left transposed by bitsandbytes' own ``state_dict()``); the weight itself is left
    as it is.

    Args:
        weight: a ``Linear4bit``'s ``weight``.

    Returns:
        ``(data, quant_state)`` that ``bitsandbytes.functional.dequantize_4bit`` reads correctly.
    """
    if _is_repacked(weight):
        return _unpack(weight.data.clone(), copy.deepcopy(weight.quant_state))
    if _has_transposed_absmax(weight):
        state = copy.copy(weight.quant_state)
        state.absmax = state.absmax.T.reshape(-1).float().contiguous()
        return weight.data, state
    return weight.data, weight.quant_state


def dequantized_4bit_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a ``Linear4bit`` stores, dequantized to ``(out, in)`` in its quant state's dtype,
    whatever layout it is in (the module is not changed)."""
    bnb = import_bnb()
    data, state = standard_4bit_state(layer.weight)
    return bnb.functional.dequantize_4bit(data, state)


def restore_standard_layout_(module: nn.Module) -> int:
    """Put every ``Linear4bit`` of ``module`` that an eval forward repacked for bitsandbytes' CPU
    AVX512-BF16 kernel back into the standard layout, in place.

    Afterwards ``state_dict()`` writes the standard tensors (bitsandbytes' own inverse writes a
    transposed absmax for plain weights) and training forwards have a backward. The module computes
    the same as before: absmax keeps the bfloat16-rounded values the kernel used (a later eval
    forward repacks again, with the same values); double-quantized absmax is quantized again
    (bitsandbytes' inverse). A layer whose repack bitsandbytes' own ``state_dict()`` undid (leaving
    its plain absmax transposed) is repaired too.

    Args:
        module: a model or layer.

    Returns:
        How many layers were restored (0 on hosts without AVX512-BF16, or before any eval forward).
    """
    restored = 0
    for layer in _linear4bit_layers(module):
        state = layer.weight.quant_state
        if _is_repacked(layer.weight):
            layer.weight.data, state = _unpack(layer.weight.data, state)
        elif _has_transposed_absmax(layer.weight):
            state.absmax = state.absmax.T.reshape(-1).float().contiguous()
        else:
            continue
        layer.weight.quant_state = state
        layer.quant_state = state
        restored += 1
    return restored


def set_cpu_bf16_kernel_(module: nn.Module, enabled: bool) -> int:
    """Turn bitsandbytes' CPU AVX512-BF16 4-bit kernel on or off in every ``Linear4bit`` of ``module``.

    Off, every CPU forward dequantizes the weight and multiplies in the compute dtype (the path of
    AVX2-only CPUs: exactly the dequantized weight's matmul, with a backward). On, the kernel is used
    only where bitsandbytes detects AVX512-BF16, as in a freshly built or reloaded layer. Turning it
    off restores the standard layout first (:func:`restore_standard_layout_`).

    Args:
        module: a model or layer.
        enabled: True for bitsandbytes' default on this host, False for the dequantize path.

    Returns:
        How many ``Linear4bit`` layers were set.

    Raises:
        TypeError: ``enabled`` is not a bool.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    layers = _linear4bit_layers(module)
    if not layers:
        return 0
    if not enabled:
        restore_standard_layout_(module)
    value = enabled and cpu_bf16_kernel_detected()
    for layer in layers:
        layer.support_avx512bf16_for_cpu = value
    return len(layers)


@contextlib.contextmanager
def cpu_bf16_kernel_off(*modules: nn.Module) -> Iterator[None]:
    """Run ``modules`` on bitsandbytes' dequantize path (see :func:`set_cpu_bf16_kernel_`), then give
    every ``Linear4bit`` its previous setting back."""
    layers = [layer for m in modules for layer in _linear4bit_layers(m)]
    previous = [getattr(layer, "support_avx512bf16_for_cpu", False) for layer in layers]
    for m in modules:
        set_cpu_bf16_kernel_(m, False)
    try:
        yield
    finally:
        for layer, value in zip(layers, previous):
            layer.support_avx512bf16_for_cpu = value


def _refuse_quantized(model: nn.Module, bnb: Any) -> None:
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False) is True:
        raise QuantizationError("the model is already quantized; quantize_bnb_ needs an unquantized model")
    for name, module in model.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            raise QuantizationError(f"{name} is already a bitsandbytes layer; quantize_bnb_ needs an unquantized model")


def _dtype_name(module: nn.Module) -> str:
    for p in module.parameters():
        return str(p.dtype).removeprefix("torch.")
    return "its dtype"


def cpu_kernel_fits(out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether bitsandbytes' CPU AVX512-BF16 4-bit kernel can run this shape."""
    return (
        out_features % CPU_KERNEL_OUT_MULTIPLE == 0
        and in_features % CPU_KERNEL_IN_MULTIPLE == 0
        and in_features % blocksize == 0
    )


def _keep_reason(d: TargetDecision, config: BnbConfig, keep_fp32: list[str]) -> str | None:
    """Why module ``d`` stays in its dtype, or None when it is quantized."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    dtype = _dtype_name(d.module)
    if not d.quantize:
        return d.reason
    if d.kind == "experts":
        return (
            "fused MoE experts: bitsandbytes has no 3-D expert layer and transformers' bnb loader converts "
            f"only nn.Linear; kept in {dtype}"
        )
    if type(d.module) is not nn.Linear:
        return (
            f"{type(d.module).__name__} is not a plain nn.Linear, which transformers' bnb loader would not "
            f"convert; kept in {dtype}"
        )
    if keep_fp32 and not should_convert_module(d.name, keep_fp32):
        return f"kept in {dtype} by the model class (_keep_in_fp32_modules)"
    out_features, in_features = d.module.out_features, d.module.in_features
    if isinstance(config, BnbInt8Config):
        for pattern in INT8_ND_INPUT_PATTERNS:
            if re.search(pattern, d.name):
                return (
                    "LLM.int8: this Linear receives inputs with more than 3 dims (DeepSeek MLA kv_b_proj gets "
                    "[batch, 1, seq, kv_lora_rank]), which bitsandbytes' Linear8bitLt rejects on CPU and CUDA; "
                    f"kept in {dtype}"
                )
    elif not cpu_kernel_fits(out_features, in_features, config.blocksize):
        return (
            f"4-bit: shape out {out_features} x in {in_features} does not fit bitsandbytes' CPU AVX512-BF16 kernel "
            f"(needs out % {CPU_KERNEL_OUT_MULTIPLE}, in % {CPU_KERNEL_IN_MULTIPLE} and in % blocksize "
            f"{config.blocksize} == 0), which a transformers reload enables on such CPUs; kept in {dtype}"
        )
    return None


def _to_bnb_linear(bnb: Any, name: str, linear: nn.Linear, config: BnbConfig) -> nn.Module:
    weight = linear.weight.detach()
    if weight.device.type == "meta":
        raise QuantizationError(f"{name}.weight is on the meta device; load the weights before quantizing")
    device = weight.device
    has_bias = linear.bias is not None
    if isinstance(config, BnbInt8Config):
        peak = float(weight.abs().max()) if weight.numel() else 0.0
        if not math.isfinite(peak) or peak > FP16_MAX:
            raise QuantizationError(
                f"{name}.weight has |w| up to {peak}; LLM.int8 quantizes through float16 (max {FP16_MAX})"
            )
        new = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias,
            has_fp16_weights=False, threshold=float(config.threshold), device="meta",
        )
        # as transformers' Bnb8bitQuantize: an Int8Params on the CPU quantizes when moved to the device
        new.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False).to(device)
    else:
        new = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=config.compute_dtype,
            compress_statistics=config.double_quant, quant_type=config.quant_type,
            quant_storage=torch.uint8, device="meta",
        )
        # Params4bit quantizes on its first move to a device (bitsandbytes' own quantize_4bit)
        new.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, blocksize=config.blocksize, compress_statistics=config.double_quant,
            quant_type=config.quant_type, quant_storage=torch.uint8, module=new,
        ).to(device)
    if has_bias:
        new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    new.source_cls = type(linear)  # what transformers' replace_with_bnb_linear records
    new.requires_grad_(False)
    new.train(linear.training)
    return new


def _transformers_config(config: BnbConfig, skip: list[str]) -> Any:
    from transformers import BitsAndBytesConfig

    if isinstance(config, BnbInt8Config):
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=float(config.threshold),
            llm_int8_skip_modules=list(skip), llm_int8_has_fp16_weight=False,
        )
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=config.quant_type, bnb_4bit_compute_dtype=config.compute_dtype,
        bnb_4bit_use_double_quant=config.double_quant, bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=list(skip),
    )


def _mark_as_transformers_bnb(model: nn.Module, config: BnbConfig, skip: list[str]) -> None:
    """Set what transformers 5.23's bnb quantizers set after ``from_pretrained`` (see
    ``HfQuantizer.preprocess_model`` / ``postprocess_model`` and ``Bnb*HfQuantizer``)."""
    from transformers import PreTrainedModel
    from transformers.quantizers.auto import AutoHfQuantizer
    from transformers.utils.quantization_config import QuantizationMethod

    if not isinstance(model, PreTrainedModel):
        return  # a bare module: swapped, but there is no transformers config to save
    qconfig = _transformers_config(config, skip)
    quantizer = AutoHfQuantizer.from_config(qconfig, pre_quantized=True)
    quantizer.modules_to_not_convert = list(skip)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    model.config.quantization_config = qconfig
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config._is_quantized = True
    if isinstance(config, BnbInt8Config):
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True


__all__ = [
    "BLOCKSIZES",
    "COMPUTE_DTYPES",
    "INT8_ND_INPUT_PATTERNS",
    "BnbFP4Config",
    "BnbInt8Config",
    "BnbNF4Config",
    "BnbUnavailableError",
    "bnb_modules",
    "cpu_bf16_kernel_detected",
    "cpu_bf16_kernel_off",
    "cpu_kernel_fits",
    "dequantized_4bit_weight",
    "import_bnb",
    "quantize_bnb_",
    "restore_standard_layout_",
    "save_bnb_model",
    "saved_bytes",
    "set_cpu_bf16_kernel_",
    "standard_4bit_state",
]
