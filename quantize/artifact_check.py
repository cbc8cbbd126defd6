"""Checks of a dsq artifact's ``quantization_config`` and quantized tensors before any module is built.

A crafted or damaged ``config.json`` must fail with an error that names the key, and a tensor of the
wrong shape with one that names the tensor, not with a traceback from deep inside the reader. The
config is checked on its own (:func:`parse_quantization_config`); the tensors against the shapes of
the modules they quantize, from the safetensors headers alone (:func:`check_quantized_tensors`); the
one value that decides a layout, ``weight_shape``, once the tensors are read
(:func:`check_weight_shapes`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dsq.core.checkpoint import read_safetensors_header
from dsq.core.errors import CheckpointError
from dsq.core.layout import ExpertProjections, expert_projections
from dsq.quantize.kv_cache import Fp8E4M3KV, Int8KV, KVCacheScheme, PerHeadKV, PerTensorKV
from dsq.quantize.modules import is_fused_experts
from dsq.quantize.scheme import SUPPORTED_BITS, PerChannel, PerGroup, WeightScheme
from dsq.quantize.w8a8 import WEIGHT_SCHEME as W8A8_WEIGHT_SCHEME
from dsq.quantize.w8a8 import ActivationScheme, DynamicPerTensor, DynamicPerToken, StaticPerTensor

STRATEGIES = ("channel", "group", "block")
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
CONFIG_KEY = "quantization_config"


@dataclass(frozen=True)
class ConfigGroup:
    """One checked ``config_groups`` entry.

    Attributes:
        key: its dotted key in config.json (``quantization_config.config_groups.group_0``).
        patterns: the compiled ``re:`` targets (module names).
        scheme: the weight scheme of the modules it targets.
        strategy: ``channel``, ``group`` or ``block`` (how the groups are laid out).
        activations: the int8 input-activation scheme of W8A8 groups, None for weight-only groups.
    """

    key: str
    patterns: tuple[re.Pattern, ...]
    scheme: WeightScheme
    strategy: str
    activations: ActivationScheme | None

    def matches(self, module_name: str) -> bool:
        return any(p.search(module_name) for p in self.patterns)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's dtype (safetensors name, e.g. ``I32``) and shape, from a safetensors header."""

    dtype: str
    shape: tuple[int, ...]


def group_for(module_name: str, groups: tuple[ConfigGroup, ...]) -> ConfigGroup | None:
    """The first config group whose targets match ``module_name`` (None: the module is not quantized)."""
    return next((g for g in groups if g.matches(module_name)), None)


# ----------------------------------------------------------------------------- the config


def parse_quantization_config(qconfig: object, source: Path) -> tuple[ConfigGroup, ...]:
    """Check a compressed-tensors ``quantization_config`` as dsq writes it and read its groups.

    Args:
        qconfig: the parsed ``quantization_config`` value.
        source: the ``config.json`` it came from (named in errors).

    Returns:
        The groups, in file order.

    Raises:
        CheckpointError: the config is not a compressed-tensors object, or a group has an unsupported or
            malformed key (``num_bits``, ``strategy``, ``group_size``, ``block_structure``, ``targets``,
            ``input_activations`` ...); the message names the key.
    """
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"{source} has no compressed-tensors quantization_config")
    raw_groups = qconfig.get("config_groups", {})
    if not isinstance(raw_groups, dict):
        raise CheckpointError(f"{source}: {CONFIG_KEY}.config_groups must be an object, got {type(raw_groups).__name__}")
    return tuple(_parse_group(f"{CONFIG_KEY}.config_groups.{name}", group, source) for name, group in raw_groups.items())


def _bad(source: Path, key: str, value: object, expected: str) -> CheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:80] + "..."
    return CheckpointError(f"{source}: {key} is {shown}; {expected}")


def _parse_group(key: str, group: object, source: Path) -> ConfigGroup:
    if not isinstance(group, dict):
        raise _bad(source, key, group, "a config group is an object with targets and weights")
    patterns = _parse_targets(f"{key}.targets", group.get("targets"), source)
    scheme, strategy = _parse_weights(f"{key}.weights", group.get("weights"), source)
    activations = _parse_activations(f"{key}.input_activations", group.get("input_activations"), scheme, source)
    if group.get("output_activations") is not None:
        raise _bad(source, f"{key}.output_activations", group["output_activations"], "dsq reads no output-activation quantization")
    return ConfigGroup(key, patterns, scheme, strategy, activations)


def _parse_targets(key: str, targets: object, source: Path) -> tuple[re.Pattern, ...]:
    if not isinstance(targets, list):
        raise _bad(source, key, targets, "expected a list of 're:' module-name patterns")
    patterns = []
    for i, target in enumerate(targets):
        if not isinstance(target, str) or not target.startswith("re:"):
            raise _bad(source, f"{key}[{i}]", target, "not a module-name pattern dsq wrote ('re:<regex>')")
        try:
            patterns.append(re.compile(target[3:]))
        except re.error as exc:
            raise _bad(source, f"{key}[{i}]", target, f"not a valid regular expression ({exc})") from None
    return tuple(patterns)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_weights(key: str, args: object, source: Path) -> tuple[WeightScheme, str]:
    if not isinstance(args, dict):
        raise _bad(source, key, args, "expected an object of weight quantization args")
    if args.get("type", "int") != "int":
        raise _bad(source, f"{key}.type", args.get("type"), "dsq reads integer weights ('int')")
    bits = args.get("num_bits")
    if not _is_int(bits) or bits not in SUPPORTED_BITS:
        raise _bad(source, f"{key}.num_bits", bits, f"dsq reads {' or '.join(map(str, SUPPORTED_BITS))}-bit weights")
    symmetric = args.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise _bad(source, f"{key}.symmetric", symmetric, "expected true or false")
    if args.get("actorder") is not None:
        raise _bad(source, f"{key}.actorder", args["actorder"], "dsq reads no activation-order (g_idx) weights")
    strategy = args.get("strategy")
    if strategy == "channel":
        granularity: PerChannel | PerGroup = PerChannel()
    elif strategy == "group":
        granularity = PerGroup(_group_size(f"{key}.group_size", args.get("group_size"), source))
    elif strategy == "block":
        block = args.get("block_structure")
        if not isinstance(block, list) or len(block) != 2 or block[0] != 1 or not _is_int(block[0]):
            raise _bad(source, f"{key}.block_structure", block, "dsq reads blocks [1, group_size]")
        granularity = PerGroup(_group_size(f"{key}.block_structure[1]", block[1], source))
    else:
        raise _bad(source, f"{key}.strategy", strategy, f"dsq reads strategy {', '.join(STRATEGIES[:-1])} or {STRATEGIES[-1]}")
    return WeightScheme(bits=bits, granularity=granularity, symmetric=symmetric), strategy


def _group_size(key: str, size: object, source: Path) -> int:
    if not _is_int(size) or size < 2:
        raise _bad(source, key, size, "a group size is an integer >= 2")
    return size


def _parse_activations(key: str, args: object, weights: WeightScheme, source: Path) -> ActivationScheme | None:
    """None (weight-only), DynamicPerToken, DynamicPerTensor or StaticPerTensor from a group's ``input_activations``."""
    if args is None or args == {}:
        return None
    if not isinstance(args, dict):
        raise _bad(source, key, args, "expected an object of activation quantization args or null")
    if weights != W8A8_WEIGHT_SCHEME:
        raise CheckpointError(f"{source}: {key}: int8 input activations need int8 per-channel symmetric weights")
    if args.get("type", "int") != "int" or args.get("num_bits") != 8 or not isinstance(args.get("symmetric", True), bool):
        raise _bad(source, key, args, "dsq reads int8 activations")
    strategy, dynamic, symmetric = args.get("strategy"), args.get("dynamic"), args.get("symmetric", True)
    if strategy == "tensor" and dynamic is True and symmetric is False:
        return DynamicPerTensor()
    if symmetric is not True:
        raise _bad(source, f"{key}.symmetric", symmetric, "dsq reads asymmetric activations only with strategy tensor, dynamic")
    if strategy == "token" and dynamic is True:
        return DynamicPerToken()
    if strategy == "tensor" and dynamic is False:
        return StaticPerTensor()
    raise _bad(source, f"{key}.strategy", strategy,
               f"with dynamic={dynamic!r}: dsq reads token/dynamic, tensor/static and tensor/dynamic/asymmetric")


_KV_TYPES = {t.ct_type: t for t in (Int8KV(), Fp8E4M3KV())}  # the names the writer uses
_KV_STRATEGIES = {g.ct_strategy: g for g in (PerTensorKV(), PerHeadKV())}


def parse_kv_cache_scheme(qconfig: dict, source: Path) -> KVCacheScheme | None:
    """The ``kv_cache_scheme`` of a checked ``quantization_config`` as dsq writes it (None: no KV-cache quantization).

    Raises:
        CheckpointError: a key dsq does not read (8-bit ``int`` or ``float``, symmetric, static, strategy ``tensor``
            or ``attn_head``), named as ``quantization_config.kv_cache_scheme.<key>``.
    """
    args = qconfig.get("kv_cache_scheme")
    key = f"{CONFIG_KEY}.kv_cache_scheme"
    if args is None:
        return None
    if not isinstance(args, dict):
        raise _bad(source, key, args, "expected an object of KV-cache quantization args or null")
    if args.get("num_bits") != 8 or isinstance(args.get("num_bits"), bool):
        raise _bad(source, f"{key}.num_bits", args.get("num_bits"), "dsq reads 8-bit KV caches")
    if args.get("type") not in _KV_TYPES:
        raise _bad(source, f"{key}.type", args.get("type"), "dsq reads 'int' (int8) or 'float' (fp8 e4m3) KV caches")
    if args.get("symmetric", True) is not True:
        raise _bad(source, f"{key}.symmetric", args.get("symmetric"), "dsq reads symmetric KV caches")
    if args.get("dynamic", False) is not False:
        raise _bad(source, f"{key}.dynamic", args.get("dynamic"), "dsq reads static (calibrated) KV-cache scales")
    if args.get("strategy") not in _KV_STRATEGIES:
        raise _bad(source, f"{key}.strategy", args.get("strategy"), "dsq reads strategy 'tensor' or 'attn_head'")
    return KVCacheScheme(_KV_TYPES[args["type"]], _KV_STRATEGIES[args["strategy"]])


# ----------------------------------------------------------------------------- the tensors


def read_tensor_specs(weight_files: tuple[Path, ...]) -> dict[str, TensorSpec]:
    """Every tensor's dtype and shape, from the safetensors headers (no tensor data is read)."""
    specs: dict[str, TensorSpec] = {}
    for path in weight_files:
        header, _ = read_safetensors_header(path)
        for name, entry in header.items():
            if name != "__metadata__":
                specs[name] = TensorSpec(entry["dtype"], tuple(entry["shape"]))
    return specs


def check_quantized_tensors(model: nn.Module, groups: tuple[ConfigGroup, ...], specs: dict[str, TensorSpec],
                            source: Path) -> dict[str, tuple[int, int]]:
    """Check every quantized module's tensors against the module's shape, as the reader will use them.

    Args:
        model: the model built from config.json (its Linear and fused-expert shapes are the reference).
        groups: the config groups.
        specs: dtype and shape of every tensor in the artifact (:func:`read_tensor_specs`).
        source: the artifact directory (named in errors).

    Returns:
        ``[out, in]`` of each packed module (prefix -> shape), for :func:`check_weight_shapes`.

    Raises:
        CheckpointError: a missing tensor, one of the wrong dtype or shape (named, with the expected
            shape), a group size that does not divide a row as its strategy requires, a zero point on a
            symmetric scheme, or experts of one module in groups with different schemes.
    """
    packed: dict[str, tuple[int, int]] = {}
    names = expert_projections(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            group = group_for(name, groups)
            if group is not None:
                _check_module(specs, name, (module.out_features, module.in_features), group, source, packed)
                if module.bias is not None:  # the module built from config.json has one: the artifact must too
                    _expect(specs, f"{name}.bias", FLOAT_DTYPES, (module.out_features,), f"the bias of {name}", source)
                elif f"{name}.bias" in specs:
                    raise CheckpointError(f"{source}: tensor {name}.bias: {name} has no bias in the model built from config.json")
        elif is_fused_experts(module):
            group = group_for(f"{name}.0.{names.gate}", groups)
            if group is not None:
                _check_experts(specs, name, module, group, groups, source, packed, names)
    return packed


def _check_experts(specs: dict[str, TensorSpec], name: str, module: nn.Module, group: ConfigGroup,
                   groups: tuple[ConfigGroup, ...], source: Path, packed: dict[str, tuple[int, int]],
                   names: ExpertProjections) -> None:
    experts, two_inter, hidden = module.gate_up_proj.shape  # (E, 2I, H); down_proj (E, H, I)
    inter = two_inter // 2
    for e in range(experts):
        for proj, shape in ((names.gate, (inter, hidden)), (names.up, (inter, hidden)), (names.down, (hidden, inter))):
            prefix = f"{name}.{e}.{proj}"
            own = group_for(prefix, groups)
            if own is None or not _same_quantization(own, group, shape[1]):
                where = "no config group" if own is None else f"config group {own.key}"
                raise CheckpointError(
                    f"{source}: {prefix} is in {where}, which quantizes it unlike {name}.0.{names.gate} ({group.key}); "
                    "the experts of one module are read with one scheme"
                )
            _check_module(specs, prefix, shape, own, source, packed)


def _same_quantization(a: ConfigGroup, b: ConfigGroup, in_features: int) -> bool:
    """Whether two groups quantize a row of ``in_features`` identically (group 64 on 32 columns is per-channel)."""
    x, y = a.scheme, b.scheme
    return (
        x.bits == y.bits and x.symmetric == y.symmetric and a.activations == b.activations
        and x.granularity.num_groups(in_features) == y.granularity.num_groups(in_features)
        and x.granularity.group_width(in_features) == y.granularity.group_width(in_features)
    )


def _check_module(specs: dict[str, TensorSpec], prefix: str, shape: tuple[int, int], group: ConfigGroup, source: Path,
                  packed: dict[str, tuple[int, int]]) -> None:
    out, in_features = shape
    scheme = group.scheme
    if group.strategy == "group" and in_features % scheme.granularity.size:
        raise CheckpointError(
            f"{source / 'config.json'}: {group.key}.weights.group_size {scheme.granularity.size} does not divide the input width "
            f"{in_features} of {prefix} (strategy 'group' needs it to; a ragged last group is strategy 'block')"
        )
    groups = scheme.granularity.num_groups(in_features)
    why = f"{prefix} ([out, in] = [{out}, {in_features}], int{scheme.bits} {scheme.granularity.describe()})"
    _expect(specs, f"{prefix}.weight_scale", FLOAT_DTYPES, (out, groups), why, source)
    if f"{prefix}.weight_packed" in specs:
        _expect(specs, f"{prefix}.weight_packed", ("I32",), (out, math.ceil(in_features * scheme.bits / 32)), why, source)
        _expect(specs, f"{prefix}.weight_shape", ("I64", "I32"), (2,), why, source)
        packed[prefix] = shape
    else:
        _expect(specs, f"{prefix}.weight", ("I8",), (out, in_features), why, source)
    zero = f"{prefix}.weight_zero_point"
    if scheme.symmetric and zero in specs:
        raise CheckpointError(f"{source}: tensor {zero} is present but {group.key}.weights.symmetric is true")
    if not scheme.symmetric:
        _expect_zero_point(specs, zero, (out, groups), scheme.bits, prefix in packed, why, source)
    if isinstance(group.activations, StaticPerTensor):
        spec = _expect(specs, f"{prefix}.input_scale", FLOAT_DTYPES, None, why, source)
        if math.prod(spec.shape) != 1:
            raise CheckpointError(f"{source}: tensor {prefix}.input_scale has shape {list(spec.shape)}; a per-tensor scale has one value")


def _expect_zero_point(specs: dict[str, TensorSpec], name: str, shape: tuple[int, int], bits: int, packed: bool,
                       why: str, source: Path) -> None:
    """A zero point in one of the layouts dsq reads.

    int8 ``[out, groups]`` (int-quantized, and the pack-quantized ``block`` strategy); for pack-quantized
    modules also int32 words packed along ``out``: ``[out, groups]`` (row-padded, what compressed-tensors
    0.20 reads) or ``[ceil(out*bits/32), groups]`` (packed, written by earlier dsq versions).
    """
    out, groups = shape
    layouts = [("I8", shape)]
    if packed:
        layouts += [("I32", shape), ("I32", (math.ceil(out * bits / 32), groups))]
    spec = specs.get(name)
    if spec is None:
        raise CheckpointError(f"{source}: tensor {name} is missing from the artifact")
    if (spec.dtype, spec.shape) not in layouts:
        expected = " or ".join(f"{dtype} {list(s)}" for dtype, s in dict.fromkeys(layouts))
        raise CheckpointError(
            f"{source}: tensor {name} is {spec.dtype} {list(spec.shape)}, expected {expected} for {why}"
        )


def _expect(specs: dict[str, TensorSpec], name: str, dtypes: tuple[str, ...], shape: tuple[int, ...] | None,
            why: str, source: Path) -> TensorSpec:
    """The header entry of tensor ``name``, which must exist with one of ``dtypes`` and ``shape`` (None: any)."""
    spec = specs.get(name)
    if spec is None:
        raise CheckpointError(f"{source}: tensor {name} is missing from the artifact")
    if shape is not None and spec.shape != shape:
        raise CheckpointError(f"{source}: tensor {name} has shape {list(spec.shape)}, expected {list(shape)} for {why}")
    if spec.dtype not in dtypes:
        raise CheckpointError(f"{source}: tensor {name} has dtype {spec.dtype}, expected {' or '.join(dtypes)}")
    return spec


def check_weight_shapes(tensors: dict[str, torch.Tensor], packed: dict[str, tuple[int, int]], source: Path) -> None:
    """Each packed module's ``weight_shape`` value is its module's ``[out, in]``.

    Raises:
        CheckpointError: a ``weight_shape`` that differs (named).
    """
    for prefix, shape in packed.items():
        found = tuple(int(v) for v in tensors[f"{prefix}.weight_shape"].tolist())
        if found != shape:
            raise CheckpointError(f"{source}: tensor {prefix}.weight_shape holds {list(found)}, expected {list(shape)}")
