"""Bytes of the source checkpoint: from its safetensors headers, or from config.json when there are none.

Config-only plans cover DeepSeek-V3's published layout: FP8 e4m3 Linear weights inside the decoder
layers with fp32 128 x 128 block scales (``weight_scale_inv``), and the multi-token-prediction
layers the published checkpoint carries but the transformers model does not use.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dsq.core.checkpoint import SAFETENSORS_DTYPE_BITS

from .artifact import DTYPE_BYTES
from .categories import is_router
from .facts import ModelFacts, tensor_bytes

MAX_EXAMPLES = 5
"""Tensor names an unused or missing list shows."""

_EXPERT_WEIGHT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_FP8_SCALE_SUFFIX = "_scale_inv"
_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E4M3": "FP8 e4m3"}


@dataclass(frozen=True)
class TensorSet:
    """A set of checkpoint tensors (e.g. those the model does not use).

    Attributes:
        tensors: how many tensors.
        parameters: their elements (FP8 block scales excluded).
        bytes: their bytes on disk (scales included).
        examples: a few names (or name patterns).
    """

    tensors: int
    parameters: int
    bytes: int
    examples: tuple[str, ...]


@dataclass(frozen=True)
class SourceBytes:
    """The source checkpoint's weights.

    Attributes:
        tensor_bytes: bytes of every tensor's data (headers excluded; unused tensors included).
        from_headers: read from safetensors headers (otherwise computed from the config).
        weight_files: number of safetensors files (0 without weights).
        storage: how the weights are stored (e.g. ``bfloat16``, ``FP8 e4m3 + fp32 128x128 block scales``).
        header_parameters: elements of the tensors the model uses, as the headers count them
            (experts summed over their per-expert tensors, scales excluded); None without headers.
        unused: tensors in the checkpoint the model does not use (e.g. the multi-token-prediction
            layer); estimated from the config when there are no headers. Not loaded, not quantized,
            not written to the artifact.
        missing: model tensors the headers lack, and tensors whose element count differs.
    """

    tensor_bytes: int
    from_headers: bool
    weight_files: int
    storage: str
    header_parameters: int | None
    unused: TensorSet | None
    missing: tuple[str, ...]

    @property
    def used_bytes(self) -> int:
        """Bytes of the tensors the model loads."""
        return self.tensor_bytes - (self.unused.bytes if self.unused is not None else 0)


@dataclass(frozen=True)
class LoadedSource:
    """What the in-memory path's loader leaves resident besides the model.

    Attributes:
        mapped: bytes of the source tensors the model uses: the loader reads them through memory maps,
            and their pages stay resident (reclaimable page cache, counted in RSS).
        converted: bytes of those stored in another dtype than the one loaded: the loader's staging
            copies, freed but kept by the C allocator (``malloc_trim`` would return them).
    """

    mapped: int
    converted: int


@dataclass(frozen=True)
class Fp8Blocks:
    """FP8 e4m3 block-scaled source weights (``quantization_config.quant_method: fp8``)."""

    block: tuple[int, int]

    def matrix_bytes(self, out: int, inp: int) -> int:
        """One e4m3 byte per element plus an fp32 scale per block."""
        return out * inp + 4 * math.ceil(out / self.block[0]) * math.ceil(inp / self.block[1])


def fp8_source_format(config: Mapping[str, Any]) -> Fp8Blocks | None:
    """The FP8 block format config.json declares, or None."""
    qc = config.get("quantization_config")
    if not isinstance(qc, Mapping) or qc.get("quant_method") != "fp8":
        return None
    block = qc.get("weight_block_size") or [128, 128]
    return Fp8Blocks((int(block[0]), int(block[1])))


def _source_dtype(config: Mapping[str, Any]) -> tuple[str, int]:
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return name, DTYPE_BYTES.get(name, 4)


def _fp8_weights(facts: ModelFacts, layer: int | None = None) -> list:
    """The targets the published FP8 layout stores in e4m3: Linears and experts inside the layers, no router."""
    return [t for t in facts.targets if t.layer is not None and (layer is None or t.layer == layer) and not is_router(t.name)]


def _config_source_bytes(facts: ModelFacts) -> tuple[int, str]:
    """Bytes of the model's tensors as the config says they are stored, and how."""
    dtype_name, dtype_bytes = _source_dtype(facts.config)
    fp8 = fp8_source_format(facts.config)
    if fp8 is None:
        return tensor_bytes(facts.tensors, dtype_bytes), dtype_name
    owners = {t.name: t for t in _fp8_weights(facts)}
    # every tensor but the FP8 weights themselves (biases stay in the config dtype)
    kept = [t for t in facts.tensors if t.name.rpartition(".")[0] not in owners or t.name.rpartition(".")[2] == "bias"]
    total = tensor_bytes(kept, dtype_bytes)
    total += sum(m.count * fp8.matrix_bytes(m.out, m.inp) for t in owners.values() for m in t.matrices)
    return total, f"FP8 e4m3 + fp32 {fp8.block[0]}x{fp8.block[1]} block scales ({dtype_name} elsewhere)"


def _mtp_estimate(facts: ModelFacts) -> TensorSet | None:
    """DeepSeek-V3's multi-token-prediction layers, which the published checkpoint carries and the
    transformers model does not use: a MoE decoder layer plus ``eh_proj`` (H x 2H), three norms, and
    its own copies of the embedding and the output head."""
    n = int(facts.config.get("num_nextn_predict_layers") or 0)
    if n <= 0 or not facts.layers:
        return None
    last = facts.layers[-1].index
    layer_params = sum(t.numel for t in facts.tensors if t.layer == last and t.parameter)
    h, v = facts.hidden, facts.vocab
    extra = 2 * h * h + 3 * h + 2 * v * h
    _, dtype_bytes = _source_dtype(facts.config)
    fp8 = fp8_source_format(facts.config)
    layer_bytes = tensor_bytes((t for t in facts.tensors if t.layer == last), dtype_bytes)
    if fp8 is not None:
        weights = _fp8_weights(facts, last)
        layer_bytes += sum(m.count * fp8.matrix_bytes(m.out, m.inp) for t in weights for m in t.matrices)
        layer_bytes -= sum(t.weight_params for t in weights) * dtype_bytes
    first = len(facts.layers)
    names = tuple(f"{facts.layer_prefix}.{first + i}.*" for i in range(n))
    return TensorSet(0, n * (layer_params + extra), n * (layer_bytes + extra * dtype_bytes), names)


def _model_key(name: str) -> str:
    """The model tensor a checkpoint tensor feeds (per-expert tensors feed the fused ones)."""
    match = _EXPERT_WEIGHT.match(name)
    if match is None:
        return name
    fused = "down_proj" if match["proj"] == "down_proj" else "gate_up_proj"
    return f"{match['prefix']}.{fused}"


def _header_source(facts: ModelFacts, headers: Sequence[Any]) -> SourceBytes:
    """Source bytes and the cross-check of the headers (:class:`dsq.core.safetensors_header.SafetensorsHeader`)
    against the model."""
    expected = {t.name: t.numel for t in facts.tensors}
    found: dict[str, int] = {}
    unused: list[tuple[str, int, int]] = []
    total = 0
    dtypes: set[str] = set()
    for header in headers:
        for name, stored in header.tensors.items():
            size = stored.data_offsets[1] - stored.data_offsets[0]
            total += size
            is_scale = name.endswith(_FP8_SCALE_SUFFIX)
            key = _model_key(name[: -len(_FP8_SCALE_SUFFIX)] if is_scale else name)
            if key not in expected:
                unused.append((name, 0 if is_scale else stored.numel, size))
            elif not is_scale:
                found[key] = found.get(key, 0) + stored.numel
                dtypes.add(stored.dtype)
    missing = [k for k in expected if k not in found] + [k for k, n in found.items() if n != expected[k]]
    return SourceBytes(
        tensor_bytes=total, from_headers=True, weight_files=len(headers), storage=_header_storage(dtypes, len(headers)),
        header_parameters=sum(found.values()), unused=_tensor_set(unused), missing=tuple(sorted(missing)),
    )


def _header_storage(dtypes: set[str], files: int) -> str:
    described = ", ".join(sorted(_DTYPE_NAMES.get(d, d) for d in dtypes))
    bits = sorted({SAFETENSORS_DTYPE_BITS.get(d, 0) for d in dtypes})
    count = f"{files} safetensors file{'s' if files != 1 else ''}"
    return f"{described} ({count}{', mixed widths' if len(bits) > 1 else ''})"


def _tensor_set(entries: list[tuple[str, int, int]]) -> TensorSet | None:
    if not entries:
        return None
    names = sorted(n for n, _, _ in entries)
    return TensorSet(len(entries), sum(p for _, p, _ in entries), sum(b for _, _, b in entries), _name_patterns(names))


def _name_patterns(names: list[str]) -> tuple[str, ...]:
    """A few names, each decoder layer's tensors folded into ``model.layers.N.*``."""
    folded: list[str] = []
    for name in names:
        match = re.match(r"^(.*\.layers\.\d+)\.", name)
        short = f"{match.group(1)}.*" if match else name
        if short not in folded:
            folded.append(short)
    return tuple(folded[:MAX_EXAMPLES])


def source_bytes(facts: ModelFacts, headers: Sequence[Any]) -> SourceBytes:
    """The source weights: from the headers when there are weight files, from the config otherwise.

    Args:
        facts: the model's facts.
        headers: the validated safetensors headers of the checkpoint's weight files (empty: config only).

    Returns:
        The source's bytes, storage and unused/missing tensors.
    """
    if headers:
        return _header_source(facts, headers)
    model_bytes, storage = _config_source_bytes(facts)
    unused = _mtp_estimate(facts)
    total = model_bytes + (unused.bytes if unused is not None else 0)
    return SourceBytes(
        tensor_bytes=total, from_headers=False, weight_files=0, storage=storage, header_parameters=None, unused=unused,
        missing=(),
    )


def loaded_source(facts: ModelFacts, headers: Sequence[Any], source: SourceBytes, dtype_name: str) -> LoadedSource:
    """What loading the whole model with transformers leaves resident besides it (see :class:`LoadedSource`).

    FP8 checkpoints are loaded by dsq's layered loader instead (:mod:`dsq.core.layered`), which closes
    each layer's maps and returns freed memory: nothing is left.

    Args:
        facts: the model's facts.
        headers: the weight files' headers (empty: config only).
        source: the source's bytes.
        dtype_name: the dtype the model is loaded in.

    Returns:
        The mapped and converted bytes.
    """
    if fp8_source_format(facts.config) is not None:
        return LoadedSource(0, 0)
    if not headers:
        stored, _ = _source_dtype(facts.config)
        return LoadedSource(source.used_bytes, source.used_bytes if stored != dtype_name else 0)
    expected = {t.name: t for t in facts.tensors}
    mapped = converted = 0
    for header in headers:
        for name, stored_tensor in header.tensors.items():
            tensor = expected.get(_model_key(name))
            if tensor is None:
                continue
            size = stored_tensor.data_offsets[1] - stored_tensor.data_offsets[0]
            mapped += size
            loaded_as = "float32" if tensor.fp32 else dtype_name
            converted += size if _DTYPE_NAMES.get(stored_tensor.dtype, stored_tensor.dtype) != loaded_as else 0
    return LoadedSource(mapped, converted)
