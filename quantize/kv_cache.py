"""Quantized KV cache: int8 or FP8 (e4m3) keys and values with calibrated static scales.

What is quantized is what the attention hands to ``cache.update`` (transformers 5), i.e. what a
serving engine stores per token:

* Llama, Qwen2: ``key_states`` / ``value_states`` ``[batch, kv_heads, seq, head_dim]``, keys after RoPE;
* DeepSeek-V2/V3/V3.2 (MLA): the compressed latent ``[batch, 1, seq, kv_lora_rank]`` (the "key" slot)
  and the shared RoPE key ``[batch, 1, seq, qk_rope_head_dim]`` (the "value" slot), as MLA caches them
  (DeepSeek-V2 paper, section 2.1.2). DeepSeek-V3.2's indexer keys (``cache.update_indexer``) are kept
  in the model's dtype and counted as such.

DeepSeek-V4 is refused: its attention stores one tensor as both key and value in a sliding window and
its compressors and indexer write compressed states into the cache layers directly, outside ``update``.

Three layers, as everywhere in ``dsq.quantize``:

* math: :func:`fake_quantize` (int8: ``clamp(round(x / s), -128, 127) * s``; FP8: ``x / s`` cast to
  ``torch.float8_e4m3fn`` and back, times ``s``), :func:`kv_scales` (``amax / 127`` or ``amax / 448``);
* modules: :func:`attach_kv_cache_quantization` gives every attention module persistent buffers
  ``k_scale`` / ``v_scale`` (fp32, ``[1]`` per tensor or ``[heads, 1, 1]`` per head, the shapes of
  compressed-tensors' ``tensor`` and ``attn_head`` strategies) and a forward pre-hook that puts a
  :class:`QuantizingCache` in place of the ``cache`` argument. It does so also when the model runs
  without a cache (``use_cache=False``: the attention would get ``None`` and skip ``update``), so every
  forward, cached or not, sees the quantized keys and values;
* orchestration: :func:`calibrate_kv_cache_` runs calibration batches in the observe phase (running
  ``amax`` of every slot), then freezes the scales and switches every attention to quantize.

This is the approach of compressed-tensors' ``QuantizedKVCache`` (``compressed_tensors/modeling/kvcache.py``)
with the argument transformers 5.25 passes (``cache``), and static scales calibrated as in
:mod:`dsq.quantize.w8a8` (``input_scale``). In the artifact the scheme is ``quantization_config.kv_cache_scheme``
and the scales are ``model.layers.N.self_attn.k_scale`` / ``.v_scale``, which vLLM reads.

Example:
    >>> scheme = KVCacheScheme(Int8KV(), PerHeadKV())
    >>> attach_kv_cache_quantization(model, scheme)
    >>> record = calibrate_kv_cache_(model, calibration_ids, batch_size=8)
    >>> model(input_ids).logits  # keys and values pass through int8
"""
from __future__ import annotations

import contextlib
import enum
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from dsq.core.errors import DsqInputError, QuantizationError

from .primitives import calibrated_scale

STATE_ATTR = "kv_cache_quantization"
"""Attribute of an attention module holding its :class:`_AttentionKV` state."""
SCALE_NAMES = ("k_scale", "v_scale")


class KVCacheUnsupported(DsqInputError):
    """The model's attention does not cache through ``cache.update`` as dsq quantizes it (names the architecture)."""


# ----------------------------------------------------------------------------- scheme


@dataclass(frozen=True)
class Int8KV:
    """Symmetric int8: ``scale = amax / 127``, ``q = clamp(round(x / scale), -128, 127)``."""

    divisor: ClassVar[float] = 127.0
    name: ClassVar[str] = "int8"
    ct_type: ClassVar[str] = "int"  # compressed-tensors QuantizationArgs.type

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 ``x`` already divided by the scale -> the representable value (fp32)."""
        return torch.round(x).clamp(-128.0, 127.0)


@dataclass(frozen=True)
class Fp8E4M3KV:
    """FP8 e4m3 (``torch.float8_e4m3fn``, largest finite 448): ``scale = amax / 448``."""

    divisor: ClassVar[float] = 448.0
    name: ClassVar[str] = "fp8_e4m3"
    ct_type: ClassVar[str] = "float"

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 ``x`` already divided by the scale -> the nearest e4m3 value (fp32); saturates at +-448."""
        return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()


KVDtype = Int8KV | Fp8E4M3KV


@dataclass(frozen=True)
class PerTensorKV:
    """One scale per attention module and slot (key, value): scale shape ``[1]``."""

    name: ClassVar[str] = "tensor"
    ct_strategy: ClassVar[str] = "tensor"


@dataclass(frozen=True)
class PerHeadKV:
    """One scale per cached head (Llama/Qwen2: KV heads; MLA: the one latent "head"): ``[heads, 1, 1]``."""

    name: ClassVar[str] = "head"
    ct_strategy: ClassVar[str] = "attn_head"


KVGranularity = PerTensorKV | PerHeadKV


@dataclass(frozen=True)
class KVCacheScheme:
    """How keys and values are stored: the element type and the scale granularity.

    Raises:
        ValueError: ``dtype`` or ``granularity`` is not one of the classes above.
    """

    dtype: KVDtype = Int8KV()
    granularity: KVGranularity = PerTensorKV()
    bytes_per_element: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, (Int8KV, Fp8E4M3KV)):
            raise ValueError(f"KV cache dtype must be Int8KV() or Fp8E4M3KV(), got {self.dtype!r}")
        if not isinstance(self.granularity, (PerTensorKV, PerHeadKV)):
            raise ValueError(f"KV cache granularity must be PerTensorKV() or PerHeadKV(), got {self.granularity!r}")

    def describe(self) -> str:
        """``int8 per-tensor KV cache`` / ``fp8_e4m3 per-head KV cache``."""
        per = "per-tensor" if isinstance(self.granularity, PerTensorKV) else "per-head"
        return f"{self.dtype.name} {per} KV cache"

    def row_suffix(self) -> str:
        """``kv-int8``, ``kv-fp8-head``: appended to a report row's name."""
        short = "int8" if isinstance(self.dtype, Int8KV) else "fp8"
        return f"kv-{short}" + ("-head" if isinstance(self.granularity, PerHeadKV) else "")


# ----------------------------------------------------------------------------- math


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, dtype: KVDtype) -> torch.Tensor:
    """``x`` stored as ``dtype`` with ``scale`` and read back: ``Q(x / scale) * scale`` in fp32, returned in ``x.dtype``.

    Args:
        x: keys or values ``[batch, heads, seq, dim]``.
        scale: fp32 ``[1]`` (per tensor) or ``[heads, 1, 1]`` (per head), positive.
        dtype: :class:`Int8KV` or :class:`Fp8E4M3KV`.

    Returns:
        The dequantized tensor, shape and dtype of ``x``. int8: the error is at most ``scale / 2`` for
        ``|x| <= 127 * scale``; e4m3: a relative error of at most 2**-4 for normal values.
    """
    s = scale.to(device=x.device, dtype=torch.float32)
    return (dtype.quantize(x.float() / s) * s).to(x.dtype)


def slot_amax(x: torch.Tensor, granularity: KVGranularity) -> torch.Tensor:
    """fp32 ``max |x|`` of ``x`` ``[batch, heads, seq, dim]``: ``[1]`` per tensor, ``[heads]`` per head."""
    a = x.detach().abs().float()
    if isinstance(granularity, PerHeadKV):
        return a.amax(dim=(0, 2, 3)) if a.numel() else a.new_zeros(x.shape[1])
    return a.amax().reshape(1) if a.numel() else a.new_zeros(1)


def kv_scales(name: str, amax: torch.Tensor, dtype: KVDtype) -> torch.Tensor:
    """Calibrated scales ``amax / divisor`` (fp32) of cache slot ``name`` (:func:`~.primitives.calibrated_scale`:
    NaN/inf/negative statistics refused, a head whose amax is 0 borrows the tensor's largest).

    Raises:
        QuantizationError: non-finite or negative amax, naming ``name``.
    """
    return calibrated_scale(name, amax, dtype.divisor, "cache head(s)")


# ----------------------------------------------------------------------------- what each architecture caches


@dataclass(frozen=True)
class KVLayout:
    """What one token costs in the cache of every decoder layer.

    Attributes:
        model_type: ``config.model_type``.
        layers: decoder layers (each caches one entry per token).
        heads: cached heads per layer (MLA: 1).
        key_dim: width of the key slot per head (MLA: ``kv_lora_rank``, the latent).
        value_dim: width of the value slot per head (MLA: ``qk_rope_head_dim``, the RoPE key).
        latent: MLA (the slots are the latent and the RoPE key).
        indexer_dim: DeepSeek-V3.2: width of the indexer's key cache per layer (kept in the model's dtype).
    """

    model_type: str
    layers: int
    heads: int
    key_dim: int
    value_dim: int
    latent: bool
    indexer_dim: int = 0

    def bytes_per_token(self, kv_element_bytes: int, model_element_bytes: int) -> int:
        """Cache bytes per token (batch 1): ``layers x (heads x (key_dim + value_dim) x kv_bytes + indexer_dim x model_bytes)``."""
        per_layer = self.heads * (self.key_dim + self.value_dim) * kv_element_bytes + self.indexer_dim * model_element_bytes
        return self.layers * per_layer

    def describe(self) -> str:
        """``4 layers x 2 heads x (64 + 64)`` / ``4 layers x (64 latent + 32 rope key)``."""
        if self.latent:
            text = f"{self.layers} layers x ({self.key_dim} latent + {self.value_dim} rope key)"
            return text + (f" + {self.indexer_dim} indexer key in the model dtype" if self.indexer_dim else "")
        return f"{self.layers} layers x {self.heads} kv heads x ({self.key_dim} key + {self.value_dim} value)"


_HEAD_ATTENTION: Mapping[str, str] = {"llama": "LlamaAttention", "qwen2": "Qwen2Attention"}
_LATENT_ATTENTION: Mapping[str, str] = {
    "deepseek_v2": "DeepseekV2Attention", "deepseek_v3": "DeepseekV3Attention", "deepseek_v32": "DeepseekV32Attention",
}
_REFUSED: Mapping[str, str] = {
    "deepseek_v4": (
        "DeepSeek-V4's attention (DeepseekV4Attention) caches one tensor as both key and value in a sliding window "
        "(cache.update(kv, kv)), and its CSA/HCA compressors and indexer write compressed KV states into the cache "
        "layers directly (cache.layers[i]), outside update(); quantizing update() alone would leave those in full "
        "precision"
    ),
}
SUPPORTED = (*_HEAD_ATTENTION, *_LATENT_ATTENTION)
"""Model types whose KV cache dsq quantizes."""


def _field(config: Mapping[str, Any] | Any, name: str, default: Any = None) -> Any:
    value = config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)
    return default if value is None else value


def unsupported_reason(model_type: object) -> str | None:
    """Why dsq does not quantize the KV cache of ``model_type`` (None: it does)."""
    if model_type in SUPPORTED:
        return None
    if model_type in _REFUSED:
        return _REFUSED[model_type]
    return f"model_type {model_type!r} has no KV-cache layout in dsq; supported: {', '.join(SUPPORTED)}"


def kv_layout(config: Mapping[str, Any] | Any) -> KVLayout:
    """The cache layout of a model from its config (a ``config.json`` dict or a transformers config).

    Raises:
        KVCacheUnsupported: the architecture is not one whose cache dsq quantizes (named, with the reason).
    """
    model_type = _field(config, "model_type")
    reason = unsupported_reason(model_type)
    if reason is not None:
        raise KVCacheUnsupported(f"KV-cache quantization does not support {model_type}: {reason}")
    layers = int(_field(config, "num_hidden_layers"))
    if model_type in _LATENT_ATTENTION:
        indexer = int(_field(config, "index_head_dim", 0)) if model_type == "deepseek_v32" else 0
        return KVLayout(model_type, layers, 1, int(_field(config, "kv_lora_rank")), int(_field(config, "qk_rope_head_dim")),
                        True, indexer)
    heads = int(_field(config, "num_attention_heads"))
    kv_heads = int(_field(config, "num_key_value_heads", heads))
    head_dim = int(_field(config, "head_dim", int(_field(config, "hidden_size")) // heads))
    return KVLayout(model_type, layers, kv_heads, head_dim, head_dim, False)


# ----------------------------------------------------------------------------- modules


class Phase(enum.Enum):
    """What an attention module's hook does with the keys and values it sees."""

    OBSERVE = "observe"  # record amax, pass through unchanged (calibration)
    QUANTIZE = "quantize"  # fake-quantize with the frozen scales


@dataclass
class _AttentionKV:
    """The KV-cache quantization state of one attention module (its scales are the module's buffers)."""

    name: str
    scheme: KVCacheScheme
    heads: int
    cache_position: int | None  # index of ``cache`` among the forward's positional parameters
    phase: Phase = Phase.OBSERVE
    enabled: bool = True
    amax: dict[str, torch.Tensor | None] = field(default_factory=lambda: {"k": None, "v": None})

    def observe(self, slot: str, x: torch.Tensor) -> None:
        seen = slot_amax(x, self.scheme.granularity)
        old = self.amax[slot]
        self.amax[slot] = seen if old is None else torch.maximum(old, seen.to(old.device))

    def process(self, module: nn.Module, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as the cache should hold them (observed, or fake-quantized)."""
        self._check_heads(key, value)
        if self.phase is Phase.OBSERVE:
            self.observe("k", key)
            self.observe("v", value)
            return key, value
        dtype = self.scheme.dtype
        return fake_quantize(key, module.k_scale, dtype), fake_quantize(value, module.v_scale, dtype)

    def _check_heads(self, key: torch.Tensor, value: torch.Tensor) -> None:
        for what, x in (("key", key), ("value", value)):
            if x.dim() != 4 or x.shape[1] != self.heads:
                raise QuantizationError(
                    f"{self.name}: the attention passed cache.update a {what} of shape {list(x.shape)}; the KV-cache "
                    f"quantizer expects [batch, {self.heads}, seq, dim]"
                )


class QuantizingCache:
    """Stands in for the attention's ``cache``: ``update`` quantizes (or observes), then delegates.

    ``update(key_states, value_states, layer_idx, ...)`` returns what the wrapped cache returns for
    the quantized tensors (the whole cached sequence), or the quantized tensors themselves when the
    model runs without a cache. DeepSeek-V3.2's ``update_indexer`` is delegated unchanged; any other
    attribute is the wrapped cache's.
    """

    def __init__(self, module: nn.Module, state: _AttentionKV, inner: Any) -> None:
        self.module = module
        self.state = state
        self.inner = inner

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        key_states, value_states = self.state.process(self.module, key_states, value_states)
        if self.inner is None:
            return key_states, value_states
        return self.inner.update(key_states, value_states, *args, **kwargs)

    def update_indexer(self, keys: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """DeepSeek-V3.2's indexer key cache (kept in the model dtype): the wrapped cache's, or ``keys`` without one."""
        return keys if self.inner is None else self.inner.update_indexer(keys, layer_idx)

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(f"{name}: the attention runs without a cache (use_cache=False); only update() is available")
        return getattr(inner, name)


def _insert_quantizing_cache(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: the ``cache`` argument (None included) becomes a :class:`QuantizingCache`."""
    state: _AttentionKV = getattr(module, STATE_ATTR)
    if not state.enabled:
        return None
    pos = state.cache_position
    if pos is not None and len(args) > pos:
        args = (*args[:pos], QuantizingCache(module, state, args[pos]), *args[pos + 1:])
        return args, kwargs
    inner = kwargs.pop("cache") if "cache" in kwargs else kwargs.pop("past_key_values", None)
    kwargs["cache"] = QuantizingCache(module, state, inner)
    return args, kwargs


def _cache_position(module: nn.Module) -> int | None:
    """Index of the ``cache`` parameter among the forward's positional parameters (None: keyword only)."""
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    if "cache" not in names:
        raise KVCacheUnsupported(
            f"{type(module).__name__}.forward has no 'cache' parameter (transformers >= 5.25 passes the KV cache as "
            f"'cache'); parameters: {', '.join(names)}"
        )
    return names.index("cache")


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every attention module whose cache dsq quantizes, in layer order.

    Raises:
        KVCacheUnsupported: the model type is not supported, or it has no such attention module.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    reason = unsupported_reason(model_type)
    if reason is not None:
        raise KVCacheUnsupported(f"KV-cache quantization does not support {model_type}: {reason}")
    cls = {**_HEAD_ATTENTION, **_LATENT_ATTENTION}[model_type]
    found = [(n, m) for n, m in model.named_modules() if type(m).__name__ == cls]
    if not found:
        raise KVCacheUnsupported(f"{model_type}: the model has no {cls} module; its KV cache cannot be quantized")
    return found


def attach_kv_cache_quantization(model: nn.Module, scheme: KVCacheScheme) -> int:
    """Give every attention module of ``model`` KV-cache quantization in the observe phase.

    Registers persistent fp32 buffers ``k_scale`` / ``v_scale`` (zeros until calibrated or loaded)
    and the forward pre-hook; the model's outputs are unchanged until :func:`freeze_kv_scales`.

    Args:
        model: a Llama, Qwen2 or DeepSeek-V2/V3/V3.2 causal LM (transformers 5).
        scheme: the KV-cache scheme.

    Returns:
        The number of attention modules.

    Raises:
        KVCacheUnsupported: unsupported architecture (named), or the model already carries KV-cache quantization.
    """
    if not isinstance(scheme, KVCacheScheme):
        raise TypeError(f"scheme must be a KVCacheScheme, got {type(scheme).__name__}")
    layout = kv_layout(model.config)
    modules = attention_modules(model)
    if any(hasattr(m, STATE_ATTR) for _, m in modules):
        raise KVCacheUnsupported("the model already carries KV-cache quantization")
    shape = (1,) if isinstance(scheme.granularity, PerTensorKV) else (layout.heads, 1, 1)
    for name, module in modules:
        device = next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))
        for scale in SCALE_NAMES:
            module.register_buffer(scale, torch.zeros(shape, dtype=torch.float32, device=device), persistent=True)
        setattr(module, STATE_ATTR, _AttentionKV(name, scheme, layout.heads, _cache_position(module)))
        module.register_forward_pre_hook(_insert_quantizing_cache, with_kwargs=True)
    return len(modules)


def _states(model: nn.Module) -> list[tuple[nn.Module, _AttentionKV]]:
    return [(m, getattr(m, STATE_ATTR)) for m in model.modules() if isinstance(getattr(m, STATE_ATTR, None), _AttentionKV)]


def kv_cache_scheme_of(model: nn.Module) -> KVCacheScheme | None:
    """The KV-cache scheme ``model`` carries (None: its cache is not quantized)."""
    states = _states(model)
    return states[0][1].scheme if states else None


def kv_scales_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"model.layers.N.self_attn.k_scale": tensor, ...}``: every calibrated scale, by state-dict name."""
    named = {id(m): n for n, m in model.named_modules()}
    return {f"{named[id(m)]}.{s}": getattr(m, s).detach().clone() for m, _ in _states(model) for s in SCALE_NAMES}


def freeze_kv_scales(model: nn.Module, *, from_amax: bool = True) -> None:
    """End calibration: scales from the observed amax (or, ``from_amax=False``, the loaded buffers), phase quantize.

    Raises:
        QuantizationError: a module saw no keys (no calibration forward reached it), or a scale is not
            finite and positive (named).
    """
    for module, state in _states(model):
        for slot, scale_name in zip(("k", "v"), SCALE_NAMES):
            buffer = getattr(module, scale_name)
            if from_amax:
                amax = state.amax[slot]
                if amax is None:
                    raise QuantizationError(f"{state.name}: no calibration forward reached this attention; {scale_name} has no statistics")
                with torch.no_grad():
                    buffer.copy_(kv_scales(f"{state.name}.{scale_name}", amax, state.scheme.dtype).reshape(buffer.shape))
            elif not torch.isfinite(buffer).all() or (buffer <= 0).any():
                raise QuantizationError(f"{state.name}.{scale_name}: KV-cache scales must be finite and > 0, got {buffer.flatten().tolist()[:8]}")
        state.amax = {"k": None, "v": None}
        state.phase = Phase.QUANTIZE


@contextlib.contextmanager
def kv_cache_quantization_off(model: nn.Module) -> Iterator[None]:
    """Within the block ``model``'s attention sees its keys and values unquantized (copies made inside stay so)."""
    states = _states(model)
    before = [s.enabled for _, s in states]
    for _, s in states:
        s.enabled = False
    try:
        yield
    finally:
        for (_, s), was in zip(states, before):
            s.enabled = was


# ----------------------------------------------------------------------------- orchestration


@dataclass(frozen=True)
class KVCalibration:
    """What calibration measured.

    Attributes:
        scheme: the scheme.
        modules: attention modules calibrated.
        samples: calibration sequences.
        seq_len: tokens per sequence.
        scale_range: ``{"k_scale": (min, max), "v_scale": (min, max)}`` over every module and head.
    """

    scheme: KVCacheScheme
    modules: int
    samples: int
    seq_len: int
    scale_range: dict[str, tuple[float, float]]

    def to_dict(self) -> dict:
        return {
            "scheme": self.scheme.describe(), "attention_modules": self.modules, "samples": self.samples,
            "seq_len": self.seq_len,
            **{f"{k}_min": lo for k, (lo, _) in self.scale_range.items()},
            **{f"{k}_max": hi for k, (_, hi) in self.scale_range.items()},
        }


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def calibrate_kv_cache_(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 8, progress: bool = False) -> KVCalibration:
    """Calibrate and freeze the KV-cache scales of ``model`` (attached with :func:`attach_kv_cache_quantization`).

    Runs ``tokens`` ``[samples, seq_len]`` through the model without a cache (the hook still sees every
    key and value), keeps the running ``amax`` of each slot, then sets ``k_scale`` / ``v_scale`` to
    ``amax / 127`` (int8) or ``amax / 448`` (e4m3) and switches every attention to quantize.

    Raises:
        QuantizationError: no KV-cache quantization attached, an attention already frozen, or a
            non-finite statistic (named).
    """
    states = _states(model)
    if not states:
        raise QuantizationError("the model carries no KV-cache quantization; call attach_kv_cache_quantization first")
    if any(s.phase is not Phase.OBSERVE for _, s in states):
        raise QuantizationError("the KV-cache scales are already frozen; attach to a fresh model to calibrate again")
    if tokens.dim() != 2 or tokens.shape[0] < 1:
        raise QuantizationError(f"KV-cache calibration needs token ids [samples, seq_len], got shape {list(tokens.shape)}")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc="calibrate (kv cache)", disable=not progress, unit="batch"):
            model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)
    freeze_kv_scales(model)
    scales = kv_scales_of(model)
    ranges = {s: (min(float(v.min()) for k, v in scales.items() if k.endswith(s)),
                  max(float(v.max()) for k, v in scales.items() if k.endswith(s))) for s in SCALE_NAMES}
    return KVCalibration(states[0][1].scheme, len(states), int(tokens.shape[0]), int(tokens.shape[1]), ranges)


# ----------------------------------------------------------------------------- compressed-tensors


def kv_cache_args(scheme: KVCacheScheme):
    """compressed-tensors ``QuantizationArgs`` of ``scheme`` (``quantization_config.kv_cache_scheme``)."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=8, type=scheme.dtype.ct_type, symmetric=True, dynamic=False, strategy=scheme.granularity.ct_strategy,
        observer="minmax",
    )


__all__ = [
    "Fp8E4M3KV", "Int8KV", "KVCacheScheme", "KVCacheUnsupported", "KVCalibration", "KVLayout", "PerHeadKV", "PerTensorKV",
    "Phase", "QuantizingCache", "attach_kv_cache_quantization", "attention_modules", "calibrate_kv_cache_", "fake_quantize",
    "freeze_kv_scales", "kv_cache_args", "kv_cache_quantization_off", "kv_cache_scheme_of", "kv_layout", "kv_scales",
    "kv_scales_of", "slot_amax", "unsupported_reason",
]
