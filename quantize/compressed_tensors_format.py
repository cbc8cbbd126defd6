"""Serialize dsq-quantized models in the compressed-tensors checkpoint format.

The format (``quantization_config.quant_method = "compressed-tensors"``) is what
transformers, vLLM and llm-compressor read. Per quantized Linear ``X``:

* ``pack-quantized`` (4-bit): ``X.weight_packed`` int32 ``[out, ceil(in/8)]`` (eight values
  per word, offset by 8, low nibble first), ``X.weight_scale`` ``[out, groups]``,
  ``X.weight_shape`` int64 ``[2]``, and for asymmetric schemes ``X.weight_zero_point``: int32
  words packed along the output dimension (see :class:`ZeroPointLayout` for the shape, which
  follows the installed compressed-tensors), or int8 ``[out, groups]`` for the ``block`` strategy.
* ``int-quantized`` (8-bit): ``X.weight`` int8 ``[out, in]``, ``X.weight_scale``, and
  ``X.weight_zero_point`` int8 for asymmetric schemes.

Words are packed and unpacked by compressed-tensors itself (``pack_to_int32`` /
``unpack_from_int32``), and the ``quantization_config`` is its ``QuantizationConfig`` of
``QuantizationScheme`` groups with ``QuantizationArgs``, serialized by the library.

Fused MoE experts are written one tensor set per expert, as in the original DeepSeek
checkpoints: ``...mlp.experts.{e}.{gate_proj,up_proj,down_proj}.*``.

W8A8 modules (:class:`~dsq.quantize.w8a8.W8A8Linear` / ``W8A8Experts``) are int-quantized
(``X.weight`` int8, ``X.weight_scale`` fp32 ``[out, 1]``, channel strategy) in groups whose
``input_activations`` are symmetric int8 ``token``/dynamic, asymmetric int8 ``tensor``/dynamic, or ``tensor``/static with an
``X.input_scale`` fp32 ``[1]`` per module (per expert and projection for experts).

A model carrying KV-cache quantization (:mod:`dsq.quantize.kv_cache`) gets ``kv_cache_scheme`` (8-bit int or
float, strategy ``tensor`` or ``attn_head``, static) and ``X.k_scale`` / ``X.v_scale`` fp32 per attention ``X``.

A group size that does not divide a layer's input width (a ragged last group) is written as
compressed-tensors' ``block`` strategy with block ``[1, group]``, which pads the last block
on load; a group at least as wide as the row is written as ``channel``. Both are exact.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache

import compressed_tensors
import torch
from compressed_tensors.compressors import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from torch import nn

from dsq.core.layout import ExpertProjections, expert_projections

from .kv_cache import KVCacheScheme, kv_cache_args, kv_cache_scheme_of
from .modules import QuantExperts, QuantLinear, QuantTensor
from .primitives import QuantizedWeight, unpack_int4
from .scheme import PerChannel, PerGroup, WeightScheme
from .w8a8 import ActivationScheme, DynamicPerTensor, DynamicPerToken, StaticPerTensor, W8A8Experts, W8A8Linear

FORMAT_4BIT = "pack-quantized"
FORMAT_8BIT = "int-quantized"


# Values per call of compressed-tensors' pack_to_int32 / unpack_from_int32, which hold int32 copies
# of every value they are given: a large matrix is converted in blocks of rows.
_BLOCK_VALUES = 1 << 24

# The unused bits of a row's last word. dsq fills them with 0x88 bytes (int4: value 0 in each nibble;
# int8: value 8), as it always has; readers ignore them. pack_to_int32 would fill them with raw zero
# bits, so rows are padded to whole words before it is called and the words stay those dsq wrote.
_PAD_BYTE = 0x88


def _pad_to_words(q: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int8 ``q`` padded along ``dim`` (0 or 1) to a whole number of ``32/bits``-value words."""
    pad = (-q.shape[dim]) % (32 // bits)
    if not pad:
        return q
    value = (_PAD_BYTE & ((1 << bits) - 1)) - (1 << (bits - 1))  # the value stored as the pad bits
    return torch.nn.functional.pad(q, (0, pad) if dim == 1 else (0, 0, 0, pad), value=value)


def _row_blocks(rows: int, width: int) -> Iterator[slice]:
    """Slices of ``rows`` rows of ``width`` values, about ``_BLOCK_VALUES`` values each."""
    step = max(1, _BLOCK_VALUES // max(width, 1))
    return (slice(start, start + step) for start in range(0, rows, step))


def _pack_weight(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """``weight_packed`` int32 ``[out, ceil(in*bits/32)]`` of a 2-D weight as :class:`QuantTensor` holds it.

    Args:
        packed: int4 bytes ``[out, ceil(in/2)]`` (:func:`~dsq.quantize.primitives.pack_int4`) or int8
            values ``[out, in]``.
        bits: 4 or 8.
        in_features: values per row.
    """
    # 8-bit: older compressed-tensors (0.12, 0.16) document pack_to_int32 for fewer than 8 bits, but its
    # arithmetic (int8 values + 128, wrapping, as uint8) gives the words of newer ones (0.19, 0.20); tests pin it.
    rows = packed.shape[0]
    words = torch.empty((rows, math.ceil(in_features * bits / 32)), dtype=torch.int32, device=packed.device)
    for block in _row_blocks(rows, in_features):
        values = unpack_int4(packed[block], in_features) if bits == 4 else packed[block]  # int8 [rows, in]
        words[block] = pack_to_int32(_pad_to_words(values, bits, dim=1), bits)
    return words


def _unpack_weight(words: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """int8 ``[out, in]`` of ``weight_packed`` int32 ``[out, ceil(in*bits/32)]``."""
    rows = words.shape[0]
    q = torch.empty((rows, in_features), dtype=torch.int8, device=words.device)
    for block in _row_blocks(rows, in_features):
        part = words[block]
        q[block] = unpack_from_int32(part, bits, torch.Size([part.shape[0], in_features]))
    return q


class ZeroPointLayout(Enum):
    """Shape of the int32 ``weight_zero_point`` of pack-quantized group and channel strategies.

    Both hold the same words: zero points offset by ``2**(bits-1)``, packed along ``out``
    (``32/bits`` values per word, lowest bits first), ``ceil(out*bits/32)`` words per group.
    """

    PACKED = "[ceil(out*bits/32), groups]"  # what compressed-tensors' own compressor writes
    ROW_PADDED = "[out, groups]"  # the packed words in the leading rows, the other rows zero


# compressed-tensors release (major, minor) -> the zero-point layout that release reads, newest first.
# From 0.20 transformers (5.24, 5.25) builds each quantized module with compressed-tensors' unpacked
# zero-point parameter [out, groups] and copies the checkpoint tensor into it by shape (a packed
# tensor is a size mismatch and the load fails); compressed-tensors then unpacks that parameter as
# int32 words packed along out and reads only the rows it needs. Row-padded words satisfy both
# (measured with compressed-tensors 0.20.1 + transformers 5.25). Earlier releases: the packed shape
# their compressor writes. dsq's reader takes either (:func:`decompress_tensor`).
ZERO_POINT_LAYOUTS: tuple[tuple[tuple[int, int], ZeroPointLayout], ...] = (
    ((0, 20), ZeroPointLayout.ROW_PADDED),
    ((0, 0), ZeroPointLayout.PACKED),
)


def zero_point_layout(version: str) -> ZeroPointLayout:
    """The zero-point layout a compressed-tensors ``version`` (e.g. ``"0.20.1"``) reads."""
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]] + [0, 0]
    release = (parts[0], parts[1])
    return next(layout for first, layout in ZERO_POINT_LAYOUTS if release >= first)


@lru_cache(maxsize=1)
def installed_zero_point_layout() -> ZeroPointLayout:
    """The layout for the installed compressed-tensors."""
    return zero_point_layout(compressed_tensors.__version__)


def pack_zero_point(zero: torch.Tensor, bits: int, strategy: str, layout: ZeroPointLayout) -> torch.Tensor:
    """The pack-quantized ``weight_zero_point`` tensor of int8 zero points ``[out, groups]``.

    Args:
        zero: int8 zero points, one per row and group.
        bits: weight bits (4 or 8).
        strategy: compressed-tensors strategy of the module (:func:`weight_args`).
        layout: the int32 shape for the group and channel strategies.

    Returns:
        int8 ``[out, groups]`` for the ``block`` strategy (compressed-tensors packs zero points
        of the group and channel strategies only), else int32 words in ``layout``.
    """
    if strategy == "block":
        return zero.contiguous()
    # compressed-tensors' own compressor packs zero points with packed_dim=0
    words = pack_to_int32(_pad_to_words(zero, bits, dim=0), bits, packed_dim=0)  # (ceil(out*bits/32), groups)
    if layout is ZeroPointLayout.PACKED:
        return words
    padded = torch.zeros(zero.shape, dtype=torch.int32, device=zero.device)
    padded[: words.shape[0]] = words
    return padded


def zero_point_bytes(out: int, in_features: int, scheme: WeightScheme, packed: bool,
                     layout: ZeroPointLayout | None = None) -> int:
    """Bytes of the ``weight_zero_point`` dsq writes for a ``[out, in_features]`` matrix (0 if symmetric).

    Args:
        out: rows of the matrix.
        in_features: columns of the matrix.
        scheme: its weight scheme.
        packed: whether the matrix is written pack-quantized (else int-quantized, int8 zero points).
        layout: the int32 layout; None: the one of the installed compressed-tensors.
    """
    if scheme.symmetric:
        return 0
    groups = scheme.granularity.num_groups(in_features)
    if not packed or _strategy(scheme, in_features)["strategy"] == "block":
        return out * groups
    layout = layout or installed_zero_point_layout()
    rows = out if layout is ZeroPointLayout.ROW_PADDED else math.ceil(out * scheme.bits / 32)
    return 4 * rows * groups


def _strategy(scheme: WeightScheme, in_features: int, full_row_group: bool = False) -> dict:
    """The ``QuantizationArgs`` fields that lay out ``scheme``'s groups on a row of ``in_features``.

    A group exactly as wide as the row is written "channel" (the same values), or "group" with
    ``full_row_group`` (see :meth:`Compressor.add`: fused experts whose other projection has several groups).
    """
    g = scheme.granularity
    one_group = isinstance(g, PerGroup) and (g.size > in_features or (g.size == in_features and not full_row_group))
    if isinstance(g, PerChannel) or one_group:
        return {"strategy": "channel"}
    if in_features % g.size == 0:
        return {"strategy": "group", "group_size": g.size}
    return {"strategy": "block", "block_structure": [1, g.size]}


def weight_args(scheme: WeightScheme, in_features: int, full_row_group: bool = False) -> QuantizationArgs:
    """compressed-tensors weight args of ``scheme`` on a row of ``in_features`` (static, min/max observer)."""
    return QuantizationArgs(
        num_bits=scheme.bits, type="int", symmetric=scheme.symmetric, dynamic=False, observer="minmax",
        **_strategy(scheme, in_features, full_row_group),
    )


def _experts_full_row_group(projections: tuple[QuantTensor, QuantTensor]) -> bool:
    """Write a row-wide group of one expert projection as "group" when the other has several groups per row.

    transformers (5.25) reads every projection of fused experts with the first config group that names
    experts; "group" read with the group size of a row-wide group gives the same values as "channel", so
    the two projections then share one group and both read right.
    """
    sizes = [qt.scheme.granularity.size for qt in projections if isinstance(qt.scheme.granularity, PerGroup)]
    return len(sizes) == 2 and any(qt.in_features > size for qt, size in zip(projections, sizes))


def input_args(act: ActivationScheme) -> QuantizationArgs:
    """compressed-tensors ``input_activations`` args of a W8A8 activation scheme (int8; symmetric but for
    :class:`DynamicPerTensor`, whose asymmetric int8 integers are its uint8 ones minus 128)."""
    int8 = {"num_bits": 8, "type": "int", "symmetric": True}
    if isinstance(act, DynamicPerToken):
        return QuantizationArgs(**int8, strategy="token", dynamic=True, observer=None)
    if isinstance(act, DynamicPerTensor):
        return QuantizationArgs(**{**int8, "symmetric": False}, strategy="tensor", dynamic=True, observer=None)
    if isinstance(act, StaticPerTensor):
        return QuantizationArgs(**int8, strategy="tensor", dynamic=False, observer="minmax")
    raise ValueError(f"no compressed-tensors input args for activation scheme {act!r}")


def compress_tensor(
    prefix: str,
    qt: QuantTensor,
    index: tuple = (),
    *,
    packed_format: bool | None = None,
    zero_layout: ZeroPointLayout | None = None,
) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors for one quantized weight, or the part ``qt[index]`` of it.

    ``index`` selects along the leading dimensions (e.g. ``(expert, rows)``); it must leave a
    2-D ``[out, in]`` weight. ``packed_format`` forces pack-quantized layout for 8-bit weights
    (transformers reads quantized MoE experts back only in packed form); by default 4-bit is
    packed and 8-bit is int-quantized. ``zero_layout`` is the shape of packed zero points
    (None: the one the installed compressed-tensors reads).
    """
    packed, scale = qt.packed[index], qt.scale[index]
    zero = qt.zero_point[index] if qt.zero_point is not None else None
    bits = qt.scheme.bits
    tensors = {f"{prefix}.weight_scale": scale.contiguous()}
    if packed_format is None:
        packed_format = bits == 4
    if not packed_format:
        tensors[f"{prefix}.weight"] = packed.contiguous()
        if zero is not None:
            tensors[f"{prefix}.weight_zero_point"] = zero.contiguous()
        return tensors
    tensors[f"{prefix}.weight_packed"] = _pack_weight(packed, bits, qt.in_features)
    tensors[f"{prefix}.weight_shape"] = torch.tensor([packed.shape[0], qt.in_features], dtype=torch.int64)
    if zero is not None:
        strategy = _strategy(qt.scheme, qt.in_features)["strategy"]
        layout = zero_layout or installed_zero_point_layout()
        tensors[f"{prefix}.weight_zero_point"] = pack_zero_point(zero, bits, strategy, layout)
    return tensors


def compress_experts(prefix: str, experts: QuantExperts, names: ExpertProjections = ExpertProjections()) -> dict[str, torch.Tensor]:
    """Per-expert compressed tensors for a :class:`QuantExperts` module at ``prefix``.

    ``gate_up_proj`` [E, 2I, H] holds the gate rows then the up rows (transformers chunks its
    output in two); ``down_proj`` is [E, H, I]. ``names``: the model type's per-expert projection names.
    """
    inter = experts.intermediate_dim
    tensors: dict[str, torch.Tensor] = {}
    for e in range(experts.num_experts):
        for proj, rows in ((names.gate, slice(0, inter)), (names.up, slice(inter, 2 * inter))):
            tensors |= compress_tensor(f"{prefix}.{e}.{proj}", experts.gate_up_proj, (e, rows), packed_format=True)
        tensors |= compress_tensor(f"{prefix}.{e}.{names.down}", experts.down_proj, (e,), packed_format=True)
    return tensors


def compress_w8a8_experts(prefix: str, experts: W8A8Experts, names: ExpertProjections = ExpertProjections()) -> dict[str, torch.Tensor]:
    """Per-expert int-quantized tensors of a :class:`W8A8Experts` module at ``prefix``.

    Per expert and projection: ``weight`` int8 ``[rows, in]``, ``weight_scale`` fp32 ``[rows, 1]`` and,
    for static activations, ``input_scale`` fp32 ``[1]`` (gate_proj and up_proj share their input,
    so they carry the same value). This is the layout of a compressed-tensors W8A8 MoE (int8 channel
    weights + int8 token activations, as vLLM's int8 MoE reads it). transformers 5.23 cannot read it:
    its expert loader dequantizes only packed or fp8 experts and fails on int8 ``weight`` tensors;
    writing the experts packed instead makes transformers load them but run them with unquantized
    activations (and drop the static input scales), silently unlike this module. dsq's own reader
    (:func:`dsq.quantize.artifact_load.load_artifact`) reads it exactly.
    """
    inter = experts.intermediate_dim
    tensors: dict[str, torch.Tensor] = {}
    for e in range(experts.num_experts):
        for proj, rows in ((names.gate, slice(0, inter)), (names.up, slice(inter, 2 * inter))):
            tensors |= compress_tensor(f"{prefix}.{e}.{proj}", experts.gate_up_proj, (e, rows), packed_format=False)
            if experts.gate_up_input_scale is not None:
                tensors[f"{prefix}.{e}.{proj}.input_scale"] = experts.gate_up_input_scale[e].reshape(1).clone()
        tensors |= compress_tensor(f"{prefix}.{e}.{names.down}", experts.down_proj, (e,), packed_format=False)
        if experts.down_input_scale is not None:
            tensors[f"{prefix}.{e}.{names.down}.input_scale"] = experts.down_input_scale[e].reshape(1).clone()
    return tensors


def split_fused_experts(prefix: str, gate_up: torch.Tensor, down: torch.Tensor,
                        names: ExpertProjections = ExpertProjections()) -> dict[str, torch.Tensor]:
    """Unquantized fused experts -> per-expert ``.weight`` tensors, as in DeepSeek checkpoints."""
    inter = gate_up.shape[1] // 2
    tensors = {}
    for e in range(gate_up.shape[0]):
        tensors[f"{prefix}.{e}.{names.gate}.weight"] = gate_up[e, :inter].contiguous()
        tensors[f"{prefix}.{e}.{names.up}.weight"] = gate_up[e, inter:].contiguous()
        tensors[f"{prefix}.{e}.down_proj.weight"] = down[e].contiguous()
    return tensors


@dataclass
class CompressedCheckpoint:
    tensors: dict[str, torch.Tensor]
    quantization_config: dict


@dataclass(frozen=True)
class _Group:
    """A config group being gathered: the modules (``re:`` targets) quantized alike."""

    weights: QuantizationArgs
    format: str
    input_activations: QuantizationArgs | None
    targets: list[str] = field(default_factory=list)

    def scheme(self) -> QuantizationScheme:
        return QuantizationScheme(
            targets=self.targets, weights=self.weights, input_activations=self.input_activations, format=self.format
        )


def compress_model(model: nn.Module, version: str) -> CompressedCheckpoint:
    """Every tensor of a dsq-quantized transformers model in compressed-tensors layout.

    Args:
        model: a model whose quantized modules are :class:`QuantLinear` / :class:`QuantExperts`
            or :class:`W8A8Linear` / :class:`W8A8Experts`.
        version: dsq version written into the config.

    Returns:
        The tensors to save and the ``quantization_config`` for ``config.json``.
    """
    compressor = Compressor(version, has_experts=any(isinstance(m, QuantExperts) for m in model.modules()),
                            experts=expert_projections(model), kv_cache=kv_cache_scheme_of(model))
    tensors = compressor.add(model)
    return CompressedCheckpoint(tensors=tensors, quantization_config=compressor.quantization_config())


class Compressor:
    """Converts a model part by part (e.g. one decoder layer at a time) and gathers one config.

    Each :meth:`add` returns that part's tensors (names are the module names inside the module
    passed, so pass a container that holds the part under its full name); the config groups and
    ``ignore`` list accumulate in module order, so adding the parts of a model in order gives the
    same ``quantization_config`` as :func:`compress_model` on the whole model.

    Args:
        version: dsq version written into the config.
        has_experts: whether the model has quantized fused experts. transformers (5.x) reads
            quantized fused experts only in pack-quantized form, and only when every 8-bit group of
            the model uses that form; dense models keep int-quantized (W8A8 experts are the
            exception: see :func:`compress_w8a8_experts`).
        experts: the model type's per-expert projection names (:func:`dsq.core.layout.expert_projections`).
        kv_cache: the model's KV-cache scheme (:mod:`dsq.quantize.kv_cache`), written as ``kv_cache_scheme``;
            its ``k_scale`` / ``v_scale`` buffers are written with the attention's other tensors.
    """

    def __init__(self, version: str, *, has_experts: bool, experts: ExpertProjections = ExpertProjections(),
                 kv_cache: KVCacheScheme | None = None) -> None:
        self.version = version
        self.has_experts = has_experts
        self.experts = experts
        self.kv_cache = kv_cache
        self.groups: dict[tuple[str, str, str], _Group] = {}
        self.ignore: list[str] = []

    def _add_target(self, args: QuantizationArgs, target: str, fmt: str, inputs: QuantizationArgs | None = None) -> None:
        key = (args.model_dump_json(), fmt, inputs.model_dump_json() if inputs else "")
        self.groups.setdefault(key, _Group(args, fmt, inputs)).targets.append(target)

    def add(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The compressed-tensors tensors of every module and tensor in ``model``."""
        has_experts = self.has_experts
        fmt8 = FORMAT_4BIT if has_experts else FORMAT_8BIT
        tensors: dict[str, torch.Tensor] = {}
        handled: set[str] = set()
        for name, module in model.named_modules():
            if isinstance(module, W8A8Linear):
                tensors |= compress_tensor(name, module.weight_q, packed_format=has_experts)
                if module.input_scale is not None:
                    tensors[f"{name}.input_scale"] = module.input_scale.reshape(1).clone()
                if module.bias is not None:
                    tensors[f"{name}.bias"] = module.bias.detach()
                self._add_target(
                    weight_args(module.scheme, module.in_features), f"re:^{re.escape(name)}$", fmt8, input_args(module.act)
                )
                handled.add(name)
            elif isinstance(module, W8A8Experts):
                tensors |= compress_w8a8_experts(name, module, self.experts)
                for qt, projs in ((module.gate_up_proj, f"{self.experts.gate}|{self.experts.up}"), (module.down_proj, self.experts.down)):
                    self._add_target(
                        weight_args(qt.scheme, qt.in_features), f"re:^{re.escape(name)}\\.\\d+\\.({projs})$", FORMAT_8BIT,
                        input_args(module.act),
                    )
                handled.add(name)
            elif isinstance(module, QuantLinear):
                tensors |= compress_tensor(name, module.weight_q, packed_format=has_experts or module.scheme.bits == 4)
                if module.bias is not None:
                    tensors[f"{name}.bias"] = module.bias.detach()
                fmt = FORMAT_4BIT if module.scheme.bits == 4 else fmt8
                self._add_target(weight_args(module.scheme, module.in_features), f"re:^{re.escape(name)}$", fmt)
                handled.add(name)
            elif isinstance(module, QuantExperts):
                tensors |= compress_experts(name, module, self.experts)
                full_row = _experts_full_row_group((module.gate_up_proj, module.down_proj))
                for qt, projs in ((module.gate_up_proj, f"{self.experts.gate}|{self.experts.up}"), (module.down_proj, self.experts.down)):
                    self._add_target(
                        weight_args(qt.scheme, qt.in_features, full_row), f"re:^{re.escape(name)}\\.\\d+\\.({projs})$",
                        FORMAT_4BIT,
                    )
                handled.add(name)
            elif isinstance(module, nn.Linear):
                self.ignore.append(name)

        state = model.state_dict()
        for key, value in state.items():
            owner = key.rpartition(".")[0]
            if any(owner == h or owner.startswith(h + ".") for h in handled):
                continue
            if key.endswith("experts.gate_up_proj"):
                prefix = key[: -len(".gate_up_proj")]
                tensors |= split_fused_experts(prefix, value, state[f"{prefix}.down_proj"], self.experts)
                self.ignore.append(f"re:^{re.escape(prefix)}\\.\\d+\\.({self.experts.pattern})$")
            elif key.endswith("experts.down_proj"):
                continue
            else:
                tensors[key] = value
        return {k: v.detach().contiguous() for k, v in tensors.items()}

    def quantization_config(self) -> dict:
        """The ``quantization_config`` of everything added so far, as compressed-tensors serializes it.

        Returns:
            ``QuantizationConfig.model_dump(mode="json")`` plus dsq's ``producer`` key (compressed-tensors
            ignores keys it does not define). The fields written follow the installed compressed-tensors
            (e.g. 0.20 omits null ``actorder`` / ``block_structure`` and adds ``moe_sparsity_config``).
        """
        formats = {g.format for g in self.groups.values()}
        config = QuantizationConfig(
            config_groups={f"group_{i}": group.scheme() for i, group in enumerate(self.groups.values())},
            format=formats.pop() if len(formats) == 1 else "mixed-precision",
            quantization_status="compressed",
            ignore=sorted(self.ignore),  # sorted: the same whether the model was added whole or layer by layer
            kv_cache_scheme=kv_cache_args(self.kv_cache) if self.kv_cache is not None else None,
            global_compression_ratio=None,
        )
        return {**config.model_dump(mode="json"), "producer": {"name": "dsq", "version": self.version}}


# ----------------------------------------------------------------------------- reading


def _unpack_zero_point(words: torch.Tensor, bits: int, out: int) -> torch.Tensor:
    """int8 ``[out, groups]`` of int32 zero points packed along ``out``, in either :class:`ZeroPointLayout`.

    Only the leading ``ceil(out*bits/32)`` rows are read, so packed and row-padded tensors agree.
    """
    # compressed-tensors 0.20's unpack_from_int32(..., packed_dim=0) fails when each group holds one word
    # (``out <= 32/bits`` packed): its transposed view keeps a stride that the uint8 view rejects. The
    # words are therefore transposed here, into fresh memory, and unpacked along dim 1.
    by_group = words.t().clone(memory_format=torch.contiguous_format)  # (groups, rows)
    return unpack_from_int32(by_group, bits, torch.Size([by_group.shape[0], out])).t().contiguous()


def decompress_tensor(tensors: dict[str, torch.Tensor], prefix: str, scheme: WeightScheme) -> QuantizedWeight:
    """Integer weight and parameters of module ``prefix`` from compressed-tensors tensors."""
    scale = tensors[f"{prefix}.weight_scale"]
    zero = tensors.get(f"{prefix}.weight_zero_point")
    if f"{prefix}.weight_packed" not in tensors:
        return QuantizedWeight(qweight=tensors[f"{prefix}.weight"], scale=scale, zero=zero, scheme=scheme)
    out, in_features = (int(v) for v in tensors[f"{prefix}.weight_shape"])
    q = _unpack_weight(tensors[f"{prefix}.weight_packed"], scheme.bits, in_features)
    if zero is not None and zero.dtype == torch.int32:
        zero = _unpack_zero_point(zero, scheme.bits, out)
    return QuantizedWeight(qweight=q, scale=scale, zero=zero, scheme=scheme)
