"""Safetensors headers checked against the model config.json describes, before any weight is read.

* :func:`check_headers_against_config`: decoder layer count, every tensor's shape and dtype, FP8 block
  scales, DeepSeek-V4's packed FP4 experts and their scales. Tensors the model does not use are
  tolerated (DeepSeek-V3's multi-token-prediction layer sits after the last decoder layer).
* :func:`stored_names`: the name each tensor the model needs has in the files, where it differs from
  the name transformers saves (no ``model.`` prefix; DeepSeek-V4's official ``embed.weight``...).
* :func:`check_expert_counts`: per-expert tensors complete and within the configured expert count.
* :func:`describe_missing`: missing tensor names for a message, runs of experts folded.

The headers come parsed from :class:`dsq.core.checkpoint.CheckpointFiles` (read once, by
:func:`dsq.core.checkpoint.inspect_checkpoint`); nothing here reads a file.
"""
from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsq.core.config_checks import ModelFacts, index_ranges, is_int, name_some
from dsq.core.errors import CheckpointError
from dsq.core.fp4 import FP4_SAFETENSORS_DTYPES, FP4ExpertFormat, fp4_format
from dsq.core.fp8 import (
    FP8_SAFETENSORS_DTYPE,
    SCALE_SAFETENSORS_DTYPES,
    FP8BlockFormat,
    find_scale,
    fp8_format,
    scale_names,
)
from dsq.core.safetensors_header import StoredTensor

FLOAT_DTYPES: frozenset[str] = frozenset({"F16", "BF16", "F32", "F64"})
"""safetensors dtypes a floating-point tensor of the model may be stored in (FP8 apart)."""

SCALE_DTYPES: frozenset[str] = SCALE_SAFETENSORS_DTYPES
"""safetensors dtypes of FP8 block scales and FP4 group scales (``weight_scale_inv`` / ``.scale``)."""

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
    ``quantization_config``, a routed expert packed FP4 (``I8``/``U8``, DeepSeek-V4) whose packed
    shape or scales do not fit the config's weight or without ``expert_dtype: "fp4"``: each is an
    error. Tensors are matched under the names transformers loads them from (:func:`stored_names`).
    The config's ``dtype`` is not required of every tensor (checkpoints mix precisions: DeepSeek keeps
    its router bias in float32). Tensors the model does not use are tolerated and named in a note.

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
    aliases = stored_names(facts.tensors, stored, facts.model)
    expected = {aliases.get(name, name): shape for name, shape in facts.tensors.items()}
    layer_prefix = _aligned_prefix(facts.layer_prefix, aliases)
    mtp_layers = _check_layer_count(root, stored, expected, layer_prefix, facts.num_layers)
    formats = _Formats(fp8_format(config), fp4_format(config))
    integers = frozenset(aliases.get(name, name) for name in facts.integer_tensors)
    problems = [p for name in sorted(stored) if (p := _tensor_problem(name, stored, expected, formats, integers)) is not None]
    if problems:
        raise CheckpointError(
            f"checkpoint {root} does not match its config.json: {len(problems)} tensor(s) differ from what "
            f"the config implies: {name_some(problems, ordered=True)}"
        )
    scales = {scale for name in expected if (scale := find_scale(name, stored)) is not None}
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


def stored_names(expected: Iterable[str], stored: Collection[str], model: Any = None) -> dict[str, str]:
    """The name each expected tensor has in the files, for those stored under another name transformers loads.

    Two differences are recognised, as transformers' loader recognises them:

    * the ``model.`` prefix: a checkpoint saved from the base model (and DeepSeek-V4's official one)
      stores ``layers.0...`` for ``model.layers.0...``;
    * the model's checkpoint conversion (``transformers/conversion_mapping.py``): DeepSeek-V4's official
      ``embed.weight`` and ``hc_head_fn`` are the ``model.embed_tokens.weight`` and ``model.hc_head.hc_fn``
      transformers saves. An expected tensor still missing is paired with a stored one that transformers
      loads into the same parameter (``rename_source_key``, as ``convert_and_load_state_dict_in_model``
      applies it); only one-to-one pairs count.

    Args:
        expected: On-disk names as transformers saves them (:attr:`dsq.core.config_checks.ModelFacts.tensors`).
        stored: The names in the checkpoint's files.
        model: The model on the ``meta`` device (for the conversion; None: the prefix only).

    Returns:
        Expected name -> stored name, for the names that differ.
    """
    names = list(expected)
    base = "model."
    strip = not any(name.startswith(base) for name in stored) and any(name.startswith(base) for name in names)
    aliases = {name: name.removeprefix(base) for name in names if strip and name.startswith(base)}
    missing = [name for name in names if aliases.get(name, name) not in stored]
    if missing and model is not None:
        taken = {aliases.get(name, name) for name in names}
        aliases.update(_pairs_by_loaded_key(missing, [name for name in stored if name not in taken], model))
    return aliases


def _pairs_by_loaded_key(missing: Sequence[str], candidates: Sequence[str], model: Any) -> dict[str, str]:
    """Missing name -> the one candidate transformers loads into the same parameter (unique pairs only)."""
    keys = _loaded_keys([*missing, *candidates], model)
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for side, names in enumerate((missing, candidates)):
        for name in names:
            if name in keys:
                groups.setdefault(keys[name], ([], []))[side].append(name)
    return {wanted[0]: found[0] for wanted, found in groups.values() if len(wanted) == 1 and len(found) == 1}


def _loaded_keys(names: Iterable[str], model: Any) -> dict[str, str]:
    """The model parameter transformers loads each checkpoint name into (names it fuses or does not load left out)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        rename_source_key,
    )

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    prefix = model.base_model_prefix
    keys: dict[str, str] = {}
    for name in names:
        key, fused = rename_source_key(name, renamings, converters, prefix, meta)
        if key not in meta and name in meta:  # transformers' own fallback: a model name is not renamed
            key, fused = rename_source_key(name, [], [], prefix, meta)
        if fused is None and key in meta:
            keys[name] = key
    return keys


def _aligned_prefix(prefix: str, aliases: Mapping[str, str]) -> str:
    """``prefix`` (``model.layers``) as the stored names spell it (``layers`` without the ``model.`` prefix)."""
    for name, alias in aliases.items():
        rest = name.removeprefix(prefix + ".")
        if rest != name and alias.endswith("." + rest):
            return alias[: -len(rest) - 1]
    return prefix


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


@dataclass(frozen=True)
class _Formats:
    """The quantized formats config.json declares (None: not declared)."""

    fp8: FP8BlockFormat | None = None
    fp4: FP4ExpertFormat | None = None


def _tensor_problem(
    name: str, stored: Mapping[str, StoredTensor], expected: Mapping[str, tuple[int, ...]], formats: _Formats,
    integers: frozenset[str] = frozenset(),
) -> str | None:
    """What is wrong with stored tensor ``name`` (None: nothing, or a tensor the model does not use)."""
    want = expected.get(name)
    if want is None:
        return None  # a scale is checked with its weight
    tensor = stored[name]
    where = f"{name} in {tensor.file.name}"
    scale_name = find_scale(name, stored)
    scale = stored[scale_name] if scale_name is not None else None
    if name in integers:
        if tensor.dtype not in INTEGER_DTYPES:
            return f"{where} has dtype {tensor.dtype}; the model needs integers ({', '.join(sorted(INTEGER_DTYPES))})"
    elif tensor.dtype == FP8_SAFETENSORS_DTYPE:
        problem = _fp8_problem(name, where, scale_name, scale, want, formats.fp8)
        if problem is not None:
            return problem
    elif tensor.dtype in FP4_SAFETENSORS_DTYPES and EXPERT_KEY.match(name) is not None:
        return _fp4_problem(name, where, tensor, scale_name, scale, want, formats.fp4)
    elif tensor.dtype not in FLOAT_DTYPES:
        fp4_hint = " (only routed experts may be packed FP4)" if tensor.dtype in FP4_SAFETENSORS_DTYPES else ""
        return (
            f"{where} has dtype {tensor.dtype}; the model needs floating point "
            f"({', '.join(sorted(FLOAT_DTYPES))}){fp4_hint}"
        )
    elif scale is not None and formats.fp8 is not None:
        return f"{where} has block scales {scale_name} but is stored as {tensor.dtype}, not {FP8_SAFETENSORS_DTYPE}"
    if tensor.shape != want:
        return f"{where} has shape {_shape(tensor.shape)}, config.json implies {_shape(want)}"
    return None


def _no_scale(where: str, stored_as: str, name: str) -> str:
    return f"{where} is {stored_as} but the checkpoint has no scales ({' or '.join(scale_names(name))})"


def _fp8_problem(
    name: str, where: str, scale_name: str | None, scale: StoredTensor | None, want: tuple[int, ...],
    fmt: FP8BlockFormat | None,
) -> str | None:
    if fmt is None:
        return f"{where} is {FP8_SAFETENSORS_DTYPE} but config.json declares no fp8 quantization_config"
    if len(want) != 2:
        return f"{where} is {FP8_SAFETENSORS_DTYPE} but only 2-D weights can be FP8 (the model's is {_shape(want)})"
    if scale is None:
        return _no_scale(where, FP8_SAFETENSORS_DTYPE, name)
    blocks = fmt.scale_shape(want)
    return _scale_problem(scale_name, scale, "block", blocks,
                          f"the {fmt.block[0]}x{fmt.block[1]} blocks of a {_shape(want)} weight need {_shape(blocks)}")


def _fp4_problem(
    name: str, where: str, tensor: StoredTensor, scale_name: str | None, scale: StoredTensor | None,
    want: tuple[int, ...], fmt: FP4ExpertFormat | None,
) -> str | None:
    """A routed expert stored as packed FP4 (DeepSeek-V4): declared, packed shape, scales."""
    stored_as = f"{tensor.dtype} (packed FP4 e2m1)"
    if fmt is None:
        return (
            f"{where} is {stored_as} but config.json declares no FP4 experts (expert_dtype \"fp4\" beside an fp8 "
            "quantization_config)"
        )
    if len(want) != 2 or want[1] % 2:
        return f"{where} is {stored_as} but the model's {_shape(want)} weight cannot be packed two values per byte"
    packed = fmt.packed_shape(want)
    if tensor.shape != packed:
        return (
            f"{where} has shape {_shape(tensor.shape)}; packed FP4 of the {_shape(want)} weight config.json implies "
            f"is {_shape(packed)} (two e2m1 values per byte along the input dimension)"
        )
    if scale is None:
        return _no_scale(where, stored_as, name)
    groups = fmt.scale_shape(want)
    return _scale_problem(scale_name, scale, "FP4", groups, f"the FP4 weight {name} {_shape(want)} needs "
                          f"{_shape(groups)} (one scale per row and {fmt.group} columns)")


def _scale_problem(scale_name: str, scale: StoredTensor, kind: str, shape: tuple[int, ...], needs: str) -> str | None:
    """A scale tensor of the wrong dtype or shape (``needs``: what its weight needs, for the message)."""
    if scale.dtype not in SCALE_DTYPES:
        return f"{scale_name} in {scale.file.name} has dtype {scale.dtype}; {kind} scales are {_scale_dtypes()}"
    if scale.shape != shape:
        return f"{scale_name} in {scale.file.name} has shape {_shape(scale.shape)}, {needs}"
    return None


def _scale_dtypes() -> str:
    return ", ".join(sorted(SCALE_DTYPES)) + " (U8: UE8M0 exponent bytes)"


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
