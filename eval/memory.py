"""Memory and size measurements: weight bytes in RAM and on disk, serving memory (weights + KV cache), peak RSS and
CUDA memory, machine facts."""
from __future__ import annotations

import os
import platform
import resource
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType

import torch
from torch import nn

from dsq.core.cpu import cpu_flags
from dsq.core.errors import CheckpointError

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
_RESET_PEAK_RSS = "5"  # clear_refs code that resets VmHWM to the current RSS


def _leaf_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Plain tensors holding a tensor's data; wrapper subclasses are flattened."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, nn.Parameter):
        return [tensor]
    names, _ = flatten()
    return [leaf for name in names for leaf in _leaf_tensors(getattr(tensor, name))]


def _storage_key(tensor: torch.Tensor) -> tuple[object, ...]:
    """Identity of a tensor's memory, so that shared (tied) tensors are counted once."""
    pointer = tensor.data_ptr() if tensor.device.type != "meta" else 0
    if pointer == 0:
        return ("object", id(tensor))
    return ("memory", tensor.device.type, pointer, tensor.numel(), tensor.dtype)


def weight_bytes_in_memory(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers.

    Packed quantized weights kept in integer buffers count by ``element_size * numel``.
    Tensors that share memory (tied embeddings) count once.

    Args:
        model: Any module.

    Returns:
        Total bytes.
    """
    seen: set[tuple[object, ...]] = set()
    total = 0
    tensors = [
        *(tensor for _, tensor in model.named_parameters(remove_duplicate=False)),
        *(tensor for _, tensor in model.named_buffers(remove_duplicate=False)),
    ]
    for tensor in tensors:
        for leaf in _leaf_tensors(tensor):
            key = _storage_key(leaf)
            if key in seen:
                continue
            seen.add(key)
            total += leaf.element_size() * leaf.numel()
    return total


SERVING_CONTEXTS: tuple[int, ...] = (4096, 32768, 131072)
"""Context lengths (tokens) at which the serving memory is stated."""


@dataclass(frozen=True)
class ContextMemory:
    """Serving one sequence of ``context`` tokens: its KV cache and, with the weights, the total."""

    context: int
    kv_cache_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class ServingMemory:
    """Memory to serve one sequence (batch 1): the weights plus the KV cache, at several context lengths.

    The cache is counted as a serving engine stores it (vLLM's ``kv_cache_dtype``): one byte per element
    for an int8 / FP8 cache, the model's dtype otherwise; per-tensor or per-head scales are negligible
    and not counted. dsq's own torch forward simulates a quantized cache (its cache holds the dequantized
    values in the model's dtype).

    Attributes:
        kv_cache: what the cache stores (``int8 per-tensor KV cache``, ``float32 KV cache``).
        layout: what each layer caches per token (:meth:`dsq.quantize.kv_cache.KVLayout.describe`).
        kv_bytes_per_token: cache bytes per token, all layers.
        weight_bytes: the model's weight bytes in memory.
        contexts: the figures at each of :data:`SERVING_CONTEXTS`.
    """

    kv_cache: str
    layout: str
    kv_bytes_per_token: int
    weight_bytes: int
    contexts: tuple[ContextMemory, ...]


def _activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes (and caches) in: its input embedding's, else its first floating tensor's."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)


def serving_memory(model: object, weight_bytes: int, contexts: tuple[int, ...] = SERVING_CONTEXTS) -> ServingMemory | None:
    """Weights plus KV cache of ``model`` at batch 1 and each of ``contexts`` tokens.

    Per layer and token the cache holds ``kv_heads x (head_dim + head_dim)`` elements (Llama, Qwen2) or
    ``kv_lora_rank + qk_rope_head_dim`` (MLA: the latent and the RoPE key; DeepSeek-V3.2 adds its indexer
    key in the model dtype); elements are one byte with a quantized KV cache
    (:func:`dsq.quantize.kv_cache.kv_cache_scheme_of`), the model's dtype otherwise.

    Args:
        model: a torch causal LM with a ``config`` (anything else: None).
        weight_bytes: its weight bytes in memory.
        contexts: context lengths.

    Returns:
        The figures, or None for a model without a torch module and config, or an architecture whose cache
        layout dsq does not model (DeepSeek-V4's sliding and compressed caches).
    """
    from dsq.quantize.kv_cache import KVCacheUnsupported, kv_cache_scheme_of, kv_layout

    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or config is None:
        return None
    try:
        layout = kv_layout(config)
    except KVCacheUnsupported:
        return None
    dtype = _activation_dtype(model)
    model_bytes = torch.empty((), dtype=dtype).element_size()
    scheme = kv_cache_scheme_of(model)
    kv_bytes = scheme.bytes_per_element if scheme is not None else model_bytes
    name = scheme.describe() if scheme is not None else f"{str(dtype).removeprefix('torch.')} KV cache"
    per_token = layout.bytes_per_token(kv_bytes, model_bytes)
    points = tuple(ContextMemory(c, c * per_token, weight_bytes + c * per_token) for c in contexts)
    return ServingMemory(name, layout.describe(), per_token, weight_bytes, points)


def _require_path(path: Path) -> Path:
    """Return ``path`` if it exists, else raise ``CheckpointError``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model artifact {path} does not exist")
    return path


def _files(path: Path) -> list[Path]:
    """``path`` itself if it is a file, else every regular file below it."""
    path = _require_path(path)
    if path.is_file():
        return [path]
    return [p for p in sorted(path.rglob("*")) if p.is_file()]


def dir_bytes(path: Path | str, suffixes: tuple[str, ...] = (".safetensors",)) -> int:
    """Bytes of the files below ``path`` whose names end with one of ``suffixes``.

    Args:
        path: Directory (searched recursively) or single file.
        suffixes: File name endings to count (e.g. ``(".safetensors", ".onnx_data")``).

    Returns:
        Total bytes.

    Raises:
        CheckpointError: ``path`` does not exist.
    """
    return sum(p.stat().st_size for p in _files(Path(path)) if p.name.endswith(suffixes))


def files_bytes(path: Path | str) -> int:
    """Bytes of all files below ``path`` (the whole artifact).

    Args:
        path: Directory (searched recursively) or single file.

    Returns:
        Total bytes.

    Raises:
        CheckpointError: ``path`` does not exist.
    """
    return sum(p.stat().st_size for p in _files(Path(path)))


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes, or ``None`` where unavailable."""
    try:
        lines = _STATUS.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def _lifetime_peak_bytes() -> int:
    """Peak RSS of the process since it started (``getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark; ``False`` where that is not permitted."""
    try:
        _CLEAR_REFS.write_text(_RESET_PEAK_RSS)
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


class PeakRSS:
    """Context manager measuring the peak resident set size of this process during a block.

    On Linux the high-water mark (``VmHWM``) is reset on entry by writing ``5`` to
    ``/proc/self/clear_refs`` and read on exit. Where the reset is not permitted the
    process-lifetime peak from ``getrusage`` is reported and ``reset_supported`` is
    ``False``. The mark is process-wide: do not nest two measurements.

    Attributes:
        start_bytes: RSS on entry.
        peak_bytes: Peak RSS during the block (set on exit).
        reset_supported: Whether ``peak_bytes`` covers only the block.
    """

    def __init__(self) -> None:
        self.start_bytes: int = 0
        self.peak_bytes: int = 0
        self.reset_supported: bool = False

    def __enter__(self) -> PeakRSS:
        self.reset_supported = _reset_peak()
        self.start_bytes = _status_bytes("VmRSS") or 0
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        peak = _status_bytes("VmHWM") if self.reset_supported else None
        self.peak_bytes = peak if peak is not None else _lifetime_peak_bytes()


def model_device(model: object) -> torch.device | None:
    """Device of a model's first parameter (or buffer); ``None`` when it has neither or is no module."""
    if not isinstance(model, nn.Module):
        return None
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


class PeakCUDA:
    """Context manager measuring the peak CUDA memory of one device during a block.

    On entry ``torch.cuda.reset_peak_memory_stats(device)``; on exit
    ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` of that device. For a device
    that is not CUDA (or ``None``) nothing is measured and both figures stay ``None``.

    Attributes:
        allocated_bytes: Peak bytes held by tensors (the caching allocator's ``allocated``).
        reserved_bytes: Peak bytes the caching allocator held from the driver (``reserved``).
    """

    def __init__(self, device: torch.device | str | None) -> None:
        device = torch.device(device) if device is not None else None
        self.device = device if device is not None and device.type == "cuda" else None
        self.allocated_bytes: int | None = None
        self.reserved_bytes: int | None = None

    def __enter__(self) -> PeakCUDA:
        if self.device is not None:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.device is not None:
            torch.cuda.synchronize(self.device)
            self.allocated_bytes = torch.cuda.max_memory_allocated(self.device)
            self.reserved_bytes = torch.cuda.max_memory_reserved(self.device)


def _cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo``, else ``platform.processor()``."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text(errors="replace").splitlines() if cpuinfo.is_file() else []
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def avx512_flags() -> list[str]:
    """This CPU's AVX-512 feature flags, sorted (what decides bitsandbytes' and ONNX Runtime's kernels)."""
    return sorted(f for f in cpu_flags() if f.startswith("avx512"))


def _total_ram_bytes() -> int | None:
    """Physical memory in bytes, where the platform reports it."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _package_version(name: str) -> str | None:
    """Installed version of a distribution, or ``None``."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_info() -> dict[str, object]:
    """Facts about this machine and software stack, for reports.

    Returns:
        ``cpu``, ``logical_cores``, ``usable_cores``, ``torch_threads``, ``total_ram_bytes``,
        ``platform``, ``python``, ``torch``, ``transformers``, ``datasets``.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "total_ram_bytes": _total_ram_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _package_version("transformers"),
        "datasets": _package_version("datasets"),
    }
