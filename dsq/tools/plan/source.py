"""Bytes of the source checkpoint: from its safetensors headers, or from config.json when there are none.

Config-only plans cover DeepSeek's published layouts:

* DeepSeek-V3/R1/V3.2: FP8 e4m3 Linear weights inside the decoder layers with float32 128 x 128 block
  scales (``weight_scale_inv``; V3.2's ``scale_fmt: ue8m0`` only constrains their values);
* DeepSeek-V4: the same FP8 weights with one-byte e8m0 block scales (``.scale``, ``F8_E8M0``), and routed
  experts in FP4 (``expert_dtype: fp4``): e2m1 values packed two per byte along K (``I8 [out, in / 2]``)
  with an e8m0 scale per row and 32 columns (``F8_E8M0 [out, in / 32]``), 4.25 bits per weight;
* in both, the Linears transformers lists in ``_keep_in_fp32_modules`` (the indexers' and compressors'
  projections) stay in bfloat16 without scales, integer tables (V4's ``tid2eid``) keep their width;
* the multi-token-prediction block the published checkpoint carries but the transformers model does not
  use (:class:`MtpBlock`).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dsq.core.checkpoint import SAFETENSORS_DTYPE_BITS
from dsq.core.errors import CheckpointError

from .artifact import DTYPE_BYTES
from .categories import is_router
from .facts import ModelFacts, SavedTensor, Target, tensor_bytes

MAX_EXAMPLES = 5
"""Tensor names an unused or missing list shows."""

_FP8_SCALE_SUFFIX = "_scale_inv"
_E8M0_SCALE_SUFFIX = ".scale"
_PACKED_FP4_DTYPES = frozenset({"I8", "U8"})
"""Safetensors dtypes a floating-point weight is packed in as FP4, two e2m1 values per byte (DeepSeek-V4's experts)."""
_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E4M3": "FP8 e4m3", "I64": "int64", "I32": "int32"}


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
class SourcePart:
    """The source tensors of one storage format (computed from the config).

    Attributes:
        label: the format (e.g. ``FP4 e2m1 + e8m0 scale per 32 columns: routed experts``).
        parameters: their elements (scales excluded).
        bytes: their bytes on disk (scales included).
    """

    label: str
    parameters: int
    bytes: int

    @property
    def bits_per_weight(self) -> float:
        """Bits on disk per element, scales included (FP8 blocks: ~8.0; FP4 experts: 4.25)."""
        return 8 * self.bytes / max(1, self.parameters)


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
        parts: the model's tensors by storage format (config-only plans of FP8 checkpoints; empty otherwise).
    """

    tensor_bytes: int
    from_headers: bool
    weight_files: int
    storage: str
    header_parameters: int | None
    unused: TensorSet | None
    missing: tuple[str, ...]
    parts: tuple[SourcePart, ...] = ()

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


E8M0_SCALE_MODEL_TYPES: frozenset[str] = frozenset({"deepseek_v4"})
"""Model types whose published FP8 checkpoints store each block scale as one e8m0 byte (DeepSeek-V4's
``<name>.scale``, ``F8_E8M0``) instead of float32 ``weight_scale_inv`` (DeepSeek-V3/R1/V3.2)."""


@dataclass(frozen=True)
class Fp8Blocks:
    """FP8 e4m3 block-scaled source weights (``quantization_config.quant_method: fp8``).

    Attributes:
        block: (rows, columns) of one scaling block.
        scale_bytes: bytes of one block scale (4: float32; 1: e8m0).
    """

    block: tuple[int, int]
    scale_bytes: int = 4

    def matrix_bytes(self, out: int, inp: int) -> int:
        """One e4m3 byte per element plus a scale per block."""
        return out * inp + self.scale_bytes * math.ceil(out / self.block[0]) * math.ceil(inp / self.block[1])

    def describe(self) -> str:
        scale = "e8m0" if self.scale_bytes == 1 else "fp32"
        return f"FP8 e4m3 + {scale} {self.block[0]}x{self.block[1]} block scales"


@dataclass(frozen=True)
class Fp4Experts:
    """Routed experts in FP4 e2m1 (DeepSeek-V4's ``expert_dtype: fp4``; see
    ``transformers/integrations/finegrained_fp8.py``): two values per byte along the input dimension and
    one e8m0 scale per row and ``group`` columns.

    Attributes:
        group: columns per scale.
        scale_bytes: bytes of one scale.
    """

    group: int = 32
    scale_bytes: int = 1

    def matrix_bytes(self, out: int, inp: int) -> int:
        """Half a byte per element plus a scale per row and group: ``[out, in / 2]`` int8 + ``[out, in / group]`` e8m0."""
        return out * math.ceil(inp / 2) + self.scale_bytes * out * math.ceil(inp / self.group)

    def describe(self) -> str:
        return f"FP4 e2m1 + e8m0 scale per {self.group} columns"


def fp8_source_format(config: Mapping[str, Any]) -> Fp8Blocks | None:
    """The FP8 block format config.json declares, or None."""
    qc = config.get("quantization_config")
    if not isinstance(qc, Mapping) or qc.get("quant_method") != "fp8":
        return None
    block = qc.get("weight_block_size") or [128, 128]
    scale_bytes = 1 if config.get("model_type") in E8M0_SCALE_MODEL_TYPES else 4
    return Fp8Blocks((int(block[0]), int(block[1])), scale_bytes)


EXPERT_DTYPES: tuple[str, ...] = ("fp4", "fp8")
"""Values of ``expert_dtype`` (top level, or in ``quantization_config``) the plan knows."""


def expert_source_format(config: Mapping[str, Any]) -> Fp4Experts | None:
    """The FP4 format of the routed experts of an FP8 checkpoint (``expert_dtype: fp4``), or None: the experts
    are stored like the other Linears.

    Raises:
        CheckpointError: ``expert_dtype`` has a value the plan does not know (the message names the key).
    """
    if fp8_source_format(config) is None:
        return None
    qc = config.get("quantization_config") or {}
    where, value = ("quantization_config.expert_dtype", qc.get("expert_dtype")) if "expert_dtype" in qc else (
        "expert_dtype", config.get("expert_dtype"))
    if value is None or value == "fp8":
        return None
    if value != "fp4":
        raise CheckpointError(f"config.json key {where} is {value!r}; the plan knows {', '.join(EXPERT_DTYPES)}")
    return Fp4Experts()


def _source_dtype(config: Mapping[str, Any]) -> tuple[str, int]:
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return name, DTYPE_BYTES.get(name, 4)


def _fp8_weights(facts: ModelFacts, layer: int | None = None) -> list[Target]:
    """The targets the published FP8 layout stores in e4m3 (or FP4): Linears and experts inside the layers,
    no router, none that the checkpoint keeps unscaled (:attr:`~.facts.Target.source_unscaled`)."""
    return [t for t in facts.targets if t.layer is not None and (layer is None or t.layer == layer)
            and not is_router(t.name) and not t.source_unscaled]


def _stored_parts(tensors: Iterable[SavedTensor], weights: Sequence[Target], fp8: Fp8Blocks, fp4: Fp4Experts | None,
                  dtype_name: str, dtype_bytes: int) -> list[SourcePart]:
    """``tensors`` by storage format: ``weights`` in FP8 blocks (routed experts in FP4 when ``fp4``), every
    other tensor (and the weights' biases) in its own width (:meth:`~.facts.SavedTensor.bytes`)."""
    owners = {t.name for t in weights}
    kept = [t for t in tensors if t.name.rpartition(".")[0] not in owners or t.name.rpartition(".")[2] == "bias"]
    groups: list[tuple[str, list[Target], Fp8Blocks | Fp4Experts]] = [
        (f"{fp8.describe()}: Linears in the decoder layers" + (" (routed experts too)" if fp4 is None else ""),
         [t for t in weights if fp4 is None or not t.experts], fp8)]
    if fp4 is not None:
        groups.append((f"{fp4.describe()}: routed experts", [t for t in weights if t.experts], fp4))
    parts = [SourcePart(label, sum(t.weight_params for t in group),
                        sum(m.count * fmt.matrix_bytes(m.out, m.inp) for t in group for m in t.matrices))
             for label, group, fmt in groups if group]
    parts.append(SourcePart(f"{dtype_name} (float32 and integer tables in their own width): every other tensor",
                            sum(t.numel for t in kept), tensor_bytes(kept, dtype_bytes)))
    return parts


def _config_source_bytes(facts: ModelFacts) -> tuple[int, str, tuple[SourcePart, ...]]:
    """Bytes of the model's tensors as the config says they are stored, how, and by format."""
    dtype_name, dtype_bytes = _source_dtype(facts.config)
    fp8 = fp8_source_format(facts.config)
    if fp8 is None:
        return tensor_bytes(facts.tensors, dtype_bytes), dtype_name, ()
    fp4 = expert_source_format(facts.config)
    parts = _stored_parts(facts.tensors, _fp8_weights(facts), fp8, fp4, dtype_name, dtype_bytes)
    experts = f", routed experts {fp4.describe()}" if fp4 is not None else ""
    return sum(p.bytes for p in parts), f"{fp8.describe()}{experts} ({dtype_name} elsewhere)", tuple(parts)


@dataclass(frozen=True)
class MtpBlock:
    """What a published checkpoint's multi-token-prediction block holds besides its decoder layer (the
    transformers model builds none of it; the plan takes the last decoder layer as a stand-in for its layer).

    Attributes:
        projections: ``(out, in)`` of its Linears outside the decoder layer.
        scaled_projections: those are stored like the layer's Linears (FP8 with block scales: DeepSeek-V4's
            ``e_proj`` and ``h_proj``), not in the model dtype (DeepSeek-V3's ``eh_proj``).
        norms: its hidden-wide norms (``enorm``, ``hnorm`` and the head's norm).
        fp32_params: float32 parameters besides (DeepSeek-V4's hyper-connection head ``hc_head_{fn,base,scale}``).
        embedding_copies: it holds its own copies of the embedding and the output head (DeepSeek-V3).
        names: the pattern of its tensor names.
    """

    projections: tuple[tuple[int, int], ...]
    scaled_projections: bool
    norms: int
    fp32_params: int
    embedding_copies: bool
    names: str


def _mtp_block(facts: ModelFacts, index: int) -> MtpBlock:
    """MTP block ``index`` of the published checkpoint: DeepSeek-V4's when the model has hyper-connection
    streams (``mtp.N.*``: ``e_proj``, ``h_proj`` [H, H], a hyper-connection head, the model's embeddings
    shared), DeepSeek-V3's otherwise (``model.layers.<L + N>.*``: ``eh_proj`` [H, 2H], own embedding and head)."""
    h = facts.hidden
    if facts.residual_streams > 1:
        n = facts.residual_streams
        return MtpBlock(((h, h), (h, h)), True, 3, n * n * h + n + 1, False, f"mtp.{index}.*")
    return MtpBlock(((h, 2 * h),), False, 3, 0, True, f"{facts.layer_prefix}.{len(facts.layers) + index}.*")


def _mtp_estimate(facts: ModelFacts) -> TensorSet | None:
    """The multi-token-prediction blocks (``num_nextn_predict_layers``) the published checkpoint carries and the
    transformers model does not use: a MoE decoder layer (the last one stands in) plus :class:`MtpBlock`."""
    n = int(facts.config.get("num_nextn_predict_layers") or 0)
    if n <= 0 or not facts.layers:
        return None
    last = facts.layers[-1].index
    layer_tensors = [t for t in facts.tensors if t.layer == last]
    layer_params = sum(t.numel for t in layer_tensors if t.parameter)
    dtype_name, dtype_bytes = _source_dtype(facts.config)
    fp8 = fp8_source_format(facts.config)
    if fp8 is None:
        layer_bytes = tensor_bytes(layer_tensors, dtype_bytes)
    else:
        layer_bytes = sum(p.bytes for p in _stored_parts(layer_tensors, _fp8_weights(facts, last), fp8,
                                                         expert_source_format(facts.config), dtype_name, dtype_bytes))
    blocks = [_mtp_block(facts, i) for i in range(n)]
    params = bytes_ = 0
    for b in blocks:
        projections = sum(out * inp for out, inp in b.projections)
        if b.scaled_projections and fp8 is not None:
            projection_bytes = sum(fp8.matrix_bytes(out, inp) for out, inp in b.projections)
        else:
            projection_bytes = projections * dtype_bytes
        copies = 2 * facts.vocab * facts.hidden if b.embedding_copies else 0
        other = b.norms * facts.hidden + copies
        params += layer_params + projections + other + b.fp32_params
        bytes_ += layer_bytes + projection_bytes + other * dtype_bytes + 4 * b.fp32_params
    return TensorSet(0, params, bytes_, tuple(b.names for b in blocks))


def _model_key(facts: ModelFacts, name: str) -> str:
    """The model tensor a checkpoint tensor loads into, by transformers' loader renaming (per-expert tensors feed the
    fused ones; DeepSeek-V4's official names are renamed)."""
    return facts.checkpoint_keys.model_key(name) if facts.checkpoint_keys is not None else name


def _scaled_weight(name: str, stored: Mapping[str, Any]) -> str | None:
    """The weight a checkpoint tensor holds the block scales of, or None: ``x.weight_scale_inv`` (DeepSeek-V3) or
    ``x.scale`` beside ``x.weight`` (DeepSeek-V4's e8m0 scales)."""
    if name.endswith(_FP8_SCALE_SUFFIX):
        return name[: -len(_FP8_SCALE_SUFFIX)]
    if name.endswith(_E8M0_SCALE_SUFFIX):
        weight = name[: -len(_E8M0_SCALE_SUFFIX)] + ".weight"
        return weight if weight in stored else None
    return None


def _elements(stored: Any, floating: bool) -> int:
    """Model elements a stored tensor holds: two per byte when a floating-point tensor is packed as FP4 in int8."""
    return 2 * stored.numel if floating and stored.dtype in _PACKED_FP4_DTYPES else stored.numel


def _header_source(facts: ModelFacts, headers: Sequence[Any]) -> SourceBytes:
    """Source bytes and the cross-check of the headers (:class:`dsq.core.safetensors_header.SafetensorsHeader`)
    against the model."""
    expected = {t.name: t for t in facts.tensors}
    stored_names = {name for header in headers for name in header.tensors}
    found: dict[str, int] = {}
    unused: list[tuple[str, int, int]] = []
    total = 0
    dtypes: set[str] = set()
    for header in headers:
        for name, stored in header.tensors.items():
            size = stored.data_offsets[1] - stored.data_offsets[0]
            total += size
            scaled = _scaled_weight(name, stored_names)
            key = _model_key(facts, scaled if scaled is not None else name)
            tensor = expected.get(key)
            if tensor is None:
                unused.append((name, 0 if scaled is not None else stored.numel, size))
            elif scaled is None:
                floating = tensor.integer_bytes is None
                found[key] = found.get(key, 0) + _elements(stored, floating)
                dtypes.add("FP4" if floating and stored.dtype in _PACKED_FP4_DTYPES else stored.dtype)
    missing = [k for k in expected if k not in found] + [k for k, n in found.items() if n != expected[k].numel]
    return SourceBytes(
        tensor_bytes=total, from_headers=True, weight_files=len(headers), storage=_header_storage(dtypes, len(headers)),
        header_parameters=sum(found.values()), unused=_tensor_set(unused), missing=tuple(sorted(missing)),
    )


def _header_storage(dtypes: set[str], files: int) -> str:
    names = {**_DTYPE_NAMES, "FP4": "FP4 e2m1 (two per int8)"}
    described = ", ".join(sorted(names.get(d, d) for d in dtypes))
    bits = sorted({SAFETENSORS_DTYPE_BITS.get(d, 4 if d == "FP4" else 0) for d in dtypes})
    count = f"{files} safetensors file{'s' if files != 1 else ''}"
    return f"{described} ({count}{', mixed widths' if len(bits) > 1 else ''})"


def _tensor_set(entries: list[tuple[str, int, int]]) -> TensorSet | None:
    if not entries:
        return None
    names = sorted(n for n, _, _ in entries)
    return TensorSet(len(entries), sum(p for _, p, _ in entries), sum(b for _, _, b in entries), _name_patterns(names))


def _name_patterns(names: list[str]) -> tuple[str, ...]:
    """A few names, each decoder layer's tensors folded into ``model.layers.N.*`` (DeepSeek-V4's MTP blocks: ``mtp.N.*``)."""
    folded: list[str] = []
    for name in names:
        match = re.match(r"^((?:.*\.)?(?:layers|mtp)\.\d+)\.", name)
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
    model_bytes, storage, parts = _config_source_bytes(facts)
    unused = _mtp_estimate(facts)
    total = model_bytes + (unused.bytes if unused is not None else 0)
    return SourceBytes(
        tensor_bytes=total, from_headers=False, weight_files=0, storage=storage, header_parameters=None, unused=unused,
        missing=(), parts=parts,
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
            tensor = expected.get(_model_key(facts, name))
            if tensor is None:
                continue
            size = stored_tensor.data_offsets[1] - stored_tensor.data_offsets[0]
            mapped += size
            loaded_as = "float32" if tensor.fp32 else dtype_name
            converted += size if _DTYPE_NAMES.get(stored_tensor.dtype, stored_tensor.dtype) != loaded_as else 0
    return LoadedSource(mapped, converted)
