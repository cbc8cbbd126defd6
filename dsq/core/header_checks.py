"""Safetensors headers checked against the model config.json describes, before any weight is read.

* :func:`check_headers_against_config`: decoder layer count, every tensor's shape and dtype, FP8 block
  scales. Tensors the model does not use are tolerated (DeepSeek-V3's multi-token-prediction layer sits
  after the last decoder layer).
* :func:`check_expert_counts`: per-expert tensors complete and within the configured expert count.
* :func:`describe_missing`: missing tensor names for a message, runs of experts folded.

The headers come parsed from :class:`dsq.core.checkpoint.CheckpointFiles` (read once, by
:func:`dsq.core.checkpoint.inspect_checkpoint`); nothing here reads a file.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsq.core.config_checks import ModelFacts, index_ranges, is_int, name_some
from dsq.core.errors import CheckpointError
from dsq.core.fp8 import FP8_SAFETENSORS_DTYPE, SCALE_SUFFIX, fp8_format
from dsq.core.safetensors_header import StoredTensor

FLOAT_DTYPES: frozenset[str] = frozenset({"F16", "BF16", "F32", "F64"})
"""safetensors dtypes a floating-point tensor of the model may be stored in (FP8 apart)."""

SCALE_DTYPES: frozenset[str] = frozenset({"F32", "BF16", "F16"})
"""safetensors dtypes of FP8 block scales (``weight_scale_inv``)."""

MTP_MARKERS = re.compile(r"\.(eh_proj|enorm|hnorm|shared_head)\.")
"""Tensors only a DeepSeek multi-token-prediction layer holds: a layer beyond ``num_hidden_layers``
with one of them is that module (the model does not use it), not a decoder layer too many."""

EXPERT_KEY = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<index>\d+)\.(?P<suffix>.+)$")
"""An on-disk per-expert tensor: ``<prefix>.experts.<index>.<suffix>``."""

EXPERT_COUNT_KEYS: tuple[str, ...] = ("n_routed_experts", "num_experts", "num_local_experts")
"""config.json keys that give the number of routed experts, in order of precedence."""


@dataclass(frozen=True)
class HeaderCheck:
    """What the headers hold beyond or short of the model, once they agree with the config.

    Attributes:
        missing: Tensors the model needs that no file holds (on-disk names).
        unused: Tensors in the files the model does not use.
        notes: Sentences for the run's report (e.g. a multi-token-prediction layer not used).
    """

    missing: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def check_headers_against_config(
    root: Path, config: Mapping[str, Any], stored: Mapping[str, StoredTensor], facts: ModelFacts
) -> HeaderCheck:
    """Check the checkpoint's tensors against the model its config.json describes.

    Decoder layers beyond ``num_hidden_layers`` (other than a multi-token-prediction module) or
    missing altogether, a tensor whose shape differs from what the config implies, a dtype that is
    not floating point, an FP8 weight without valid block scales or without an FP8
    ``quantization_config``: each is an error. The config's ``dtype`` is not required of every
    tensor (checkpoints mix precisions: DeepSeek keeps its router bias in float32). Tensors the
    model does not use are tolerated and named in a note.

    Args:
        root: The checkpoint directory (named in messages).
        config: Its parsed config.json.
        stored: Its tensors (:attr:`dsq.core.checkpoint.CheckpointFiles.tensors`).
        facts: The model's facts (:func:`dsq.core.config_checks.model_facts`).

    Returns:
        The missing and unused tensors and the notes for the report.

    Raises:
        CheckpointError: Headers and config disagree; the message names the tensors (at most
            :data:`dsq.core.config_checks.MAX_NAMED_KEYS`), their shape in the file and the shape the config implies.
    """
    expected = _align_prefix(facts.tensors, stored)
    layer_prefix = _aligned_name(facts.layer_prefix, expected, facts.tensors)
    mtp_layers = _check_layer_count(root, stored, expected, layer_prefix, facts.num_layers)
    fmt = fp8_format(config)
    integers = frozenset(_align_prefix(dict.fromkeys(facts.integer_tensors, ()), stored))
    problems = [p for name in sorted(stored) if (p := _tensor_problem(name, stored, expected, fmt, integers)) is not None]
    if problems:
        raise CheckpointError(
            f"checkpoint {root} does not match its config.json: {len(problems)} tensor(s) differ from what "
            f"the config implies: {name_some(problems, ordered=True)}"
        )
    scales = {name for name in stored if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in expected}
    unused = tuple(sorted(set(stored) - set(expected) - scales))
    missing = tuple(sorted(set(expected) - set(stored)))
    return HeaderCheck(missing=missing, unused=unused, notes=_unused_notes(unused, layer_prefix, mtp_layers, facts.num_layers))


def _unused_notes(unused: Sequence[str], prefix: str, mtp_layers: Sequence[int], num_layers: int) -> tuple[str, ...]:
    """One note for the multi-token-prediction layers, one for every other tensor the model does not use."""
    notes = []
    if mtp_layers:
        notes.append(
            f"checkpoint tensors of layer(s) {index_ranges(mtp_layers)} beyond num_hidden_layers {num_layers} form a "
            f"multi-token-prediction module ({prefix}.{mtp_layers[0]}.*), which the model does not use"
        )
    mtp_prefixes = tuple(f"{prefix}.{index}." for index in mtp_layers)
    others = [name for name in unused if not name.startswith(mtp_prefixes)]
    if others:
        notes.append(f"{len(others)} checkpoint tensor(s) are not used by the model: {name_some(others)}")
    return tuple(notes)


def _align_prefix(expected: Mapping[str, tuple[int, ...]], stored: Mapping[str, Any]) -> Mapping[str, tuple[int, ...]]:
    """A checkpoint saved from the base model stores ``layers.0...`` for ``model.layers.0...``; transformers
    loads it, so its names are matched without the prefix."""
    base = "model."
    if any(name.startswith(base) for name in stored) or not any(name.startswith(base) for name in expected):
        return expected
    return {name.removeprefix(base): shape for name, shape in expected.items()}


def _aligned_name(name: str, aligned: Mapping[str, Any], original: Mapping[str, Any]) -> str:
    return name if aligned is original else name.removeprefix("model.")


def _check_layer_count(
    root: Path, stored: Mapping[str, StoredTensor], expected: Iterable[str], prefix: str, num_layers: int
) -> list[int]:
    """Raise on decoder layers the config does not have or the files lack; return the MTP layers.

    A layer index beyond ``num_hidden_layers`` is a decoder layer too many when it holds tensors a
    decoder layer has (``self_attn.o_proj.weight`` ...), a multi-token-prediction module when it holds
    one of :data:`MTP_MARKERS`, and otherwise just tensors the model does not use.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    layers: dict[int, list[str]] = {}
    for name in stored:
        match = pattern.match(name)
        if match is not None:
            layers.setdefault(int(match.group(1)), []).append(match.group(2))
    layer_tensors = {match.group(2) for name in expected if (match := pattern.match(name)) is not None}
    beyond = sorted(index for index in layers if index >= num_layers)
    mtp = [index for index in beyond if any(MTP_MARKERS.search(f".{rest}") for rest in layers[index])]
    extra = [index for index in beyond if index not in mtp and not layer_tensors.isdisjoint(layers[index])]
    if extra:
        files = sorted({stored[f"{prefix}.{index}.{rest}"].file.name for index in extra for rest in layers[index]})
        verb = "holds" if len(files) == 1 else "hold"
        raise CheckpointError(
            f"checkpoint {root}: config.json num_hidden_layers is {num_layers} but {name_some(files)} {verb} "
            f"tensors of decoder layer(s) {index_ranges(extra)} ({prefix}.{extra[0]}.*); config.json and the "
            "weights describe different models"
        )
    absent = [index for index in range(num_layers) if index not in layers]
    if absent:
        raise CheckpointError(
            f"checkpoint {root}: config.json num_hidden_layers is {num_layers} but the weights hold no tensor "
            f"of decoder layer(s) {index_ranges(absent)} ({prefix}.{absent[0]}.*)"
        )
    return mtp


INTEGER_DTYPES: frozenset[str] = frozenset({"I64", "I32", "I16", "U8", "I8"})
"""Safetensors dtypes an integer table (DeepSeek-V4's ``tid2eid``) may be stored in."""


def _tensor_problem(
    name: str, stored: Mapping[str, StoredTensor], expected: Mapping[str, tuple[int, ...]], fmt: Any,
    integers: frozenset[str] = frozenset(),
) -> str | None:
    """What is wrong with stored tensor ``name`` (None: nothing, or a tensor the model does not use)."""
    if name.endswith(SCALE_SUFFIX):
        return None  # checked with its weight
    want = expected.get(name)
    if want is None:
        return None
    tensor = stored[name]
    where = f"{name} in {tensor.file.name}"
    scale = stored.get(name + SCALE_SUFFIX)
    if name in integers:
        if tensor.dtype not in INTEGER_DTYPES:
            return f"{where} has dtype {tensor.dtype}; the model needs integers ({', '.join(sorted(INTEGER_DTYPES))})"
    elif tensor.dtype == FP8_SAFETENSORS_DTYPE:
        problem = _fp8_problem(name, where, scale, want, fmt)
        if problem is not None:
            return problem
    elif tensor.dtype not in FLOAT_DTYPES:
        return f"{where} has dtype {tensor.dtype}; the model needs floating point ({', '.join(sorted(FLOAT_DTYPES))})"
    elif scale is not None and fmt is not None:
        return f"{where} has block scales {name + SCALE_SUFFIX} but is stored as {tensor.dtype}, not {FP8_SAFETENSORS_DTYPE}"
    if tensor.shape != want:
        return f"{where} has shape {_shape(tensor.shape)}, config.json implies {_shape(want)}"
    return None


def _fp8_problem(name: str, where: str, scale: StoredTensor | None, want: tuple[int, ...], fmt: Any) -> str | None:
    if fmt is None:
        return f"{where} is {FP8_SAFETENSORS_DTYPE} but config.json declares no fp8 quantization_config"
    if len(want) != 2:
        return f"{where} is {FP8_SAFETENSORS_DTYPE} but only 2-D weights can be FP8 (the model's is {_shape(want)})"
    scale_name = name + SCALE_SUFFIX
    if scale is None:
        return f"{where} is {FP8_SAFETENSORS_DTYPE} but the checkpoint has no {scale_name}"
    if scale.dtype not in SCALE_DTYPES:
        return f"{scale_name} in {scale.file.name} has dtype {scale.dtype}; block scales are F32, BF16 or F16"
    blocks = fmt.scale_shape(want)
    if scale.shape != blocks:
        return (
            f"{scale_name} in {scale.file.name} has shape {_shape(scale.shape)}, the {fmt.block[0]}x{fmt.block[1]} "
            f"blocks of a {_shape(want)} weight need {_shape(blocks)}"
        )
    return None


def _shape(shape: Sequence[int]) -> str:
    return str(tuple(shape))


def describe_missing(names: Iterable[str]) -> list[str]:
    """Missing tensor names for a message, runs of experts folded.

    ``...experts.{8-15}.{down_proj.weight,up_proj.weight}`` stands for those projections of
    experts 8 to 15; a single missing expert's tensors are named one by one.

    Args:
        names: On-disk names of missing tensors.

    Returns:
        One entry per tensor, or per folded run of experts, sorted.
    """
    by_expert: dict[tuple[str, int], set[str]] = {}
    described: list[str] = []
    for name in names:
        match = EXPERT_KEY.match(name)
        if match is None:
            described.append(name)
        else:
            by_expert.setdefault((match["prefix"], int(match["index"])), set()).add(match["suffix"])
    runs: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    for (prefix, index), suffixes in by_expert.items():
        runs.setdefault((prefix, tuple(sorted(suffixes))), []).append(index)
    for (prefix, suffixes), indices in runs.items():
        if len(indices) == 1:
            described.extend(f"{prefix}.{indices[0]}.{suffix}" for suffix in suffixes)
            continue
        tail = suffixes[0] if len(suffixes) == 1 else "{" + ",".join(suffixes) + "}"
        described.append(f"{prefix}.{{{index_ranges(sorted(indices))}}}.{tail}")
    return sorted(described)


def check_expert_counts(root: Path, config: Mapping[str, Any], tensor_names: Iterable[str]) -> None:
    """Check that per-expert MoE tensors are complete and within the configured expert count.

    Files store experts one by one (``...mlp.experts.3.up_proj.weight``) while transformers
    fuses them into 3-D parameters on load, so a missing expert tensor would otherwise surface
    as an opaque conversion error, and an expert beyond the configured count would be dropped.

    Args:
        root: The checkpoint directory (named in messages).
        config: Its parsed config.json.
        tensor_names: Every tensor name in its weight files.

    Raises:
        CheckpointError: An expert tensor is missing, or an expert index reaches the configured
            count (``n_routed_experts``); the message names the tensors.
    """
    found: dict[str, set[tuple[int, str]]] = {}
    for name in tensor_names:
        match = EXPERT_KEY.match(name)
        if match is not None:
            found.setdefault(match["prefix"], set()).add((int(match["index"]), match["suffix"]))
    key, configured = _configured_expert_count(config)
    if configured is not None:
        beyond = {
            prefix: sorted({index for index, _ in present if index >= configured}) for prefix, present in found.items()
        }
        listed = [f"{prefix}.{{{index_ranges(extra)}}}.*" for prefix, extra in sorted(beyond.items()) if extra]
        if listed:
            raise CheckpointError(
                f"checkpoint {root} holds experts beyond config.json {key} {configured} (numbered 0 to "
                f"{configured - 1}) in {len(listed)} expert module(s): {name_some(listed)}"
            )
    missing: list[str] = []
    for prefix, present in sorted(found.items()):
        count = configured if configured is not None else 1 + max(index for index, _ in present)
        suffixes = sorted({suffix for _, suffix in present})
        missing.extend(
            f"{prefix}.{index}.{suffix}"
            for index in range(count)
            for suffix in suffixes
            if (index, suffix) not in present
        )
    if missing:
        counted = f" (config.json {key} is {configured})" if configured is not None else ""
        raise CheckpointError(
            f"checkpoint {root} is missing {len(missing)} expert tensor(s){counted}: "
            f"{name_some(describe_missing(missing))}"
        )


def _configured_expert_count(config: Mapping[str, Any]) -> tuple[str, int | None]:
    for key in EXPERT_COUNT_KEYS:
        value = config.get(key)
        if is_int(value) and value > 0:
            return key, value
    return EXPERT_COUNT_KEYS[0], None
