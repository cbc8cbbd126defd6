"""Preflight: config.json, safetensors headers, tokenizer and recipe checked against each other.

Everything here runs before any weight is read, so a checkpoint or recipe that disagrees with
itself fails at once with a message naming the key, the tensor or the file, instead of as a
traceback deep in transformers or as silently wrong numbers at the end of a run:

* :func:`check_config_types`: the numeric fields of ``config.json`` have the right type and sign.
* :func:`model_facts`: the model ``config.json`` describes, built on the ``meta`` device (no memory):
  the tensors it expects on disk (fused MoE experts split one tensor per expert, as DeepSeek's
  checkpoints store them; a tied ``lm_head`` left out), its decoder layers, its quantizable modules.
* :func:`check_headers_against_config`: the safetensors headers against those facts: decoder layer
  count, every tensor's shape and dtype, FP8 block scales. Tensors the model does not use are
  tolerated (DeepSeek-V3's multi-token-prediction layer sits after the last decoder layer).
* :func:`check_expert_counts`: per-expert tensors complete and within the configured expert count.
* :func:`check_tokenizer`: no token id beyond ``vocab_size`` (a smaller tokenizer is a note).
* :func:`check_recipe_against_model`: sequence lengths within ``max_position_embeddings`` and
  ``quantize.targets`` patterns that match modules of this model.

Example:
    >>> config = json.loads(Path("ckpt/config.json").read_text())
    >>> check_config_types(config, Path("ckpt/config.json"))
    >>> facts = model_facts(config, Path("ckpt/config.json"))
    >>> facts.tensors["model.layers.1.mlp.experts.0.up_proj.weight"]
    (128, 256)
"""
from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dsq.core.errors import CheckpointError
from dsq.core.fp8 import FP8_SAFETENSORS_DTYPE, SCALE_SUFFIX, fp8_format

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


logger = logging.getLogger(__name__)

MAX_NAMED_KEYS = 10
"""How many offending tensor names an error message lists."""

MAX_EXAMPLE_MODULES = 6
"""How many module names an unmatched-pattern error shows."""

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

# --------------------------------------------------------------------------- config field types


@dataclass(frozen=True)
class IntField:
    """An integer field of config.json.

    Attributes:
        key: The key (dots reach into nested objects).
        minimum: Smallest allowed value.
        nullable: ``null`` is allowed (transformers then uses a derived value).
    """

    key: str
    minimum: int = 1
    nullable: bool = False

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (None: nothing)."""
        if value is None and self.nullable:
            return None
        if not _is_int(value):
            return f"must be an integer >= {self.minimum}, got {_describe(value)}"
        if value < self.minimum:
            return f"must be an integer >= {self.minimum}, got {value}"
        return None


@dataclass(frozen=True)
class FloatField:
    """A real-valued field of config.json (an integer is accepted: ``rope_theta: 10000``).

    Attributes:
        key: The key (dots reach into nested objects).
        nullable: ``null`` is allowed.
    """

    key: str
    nullable: bool = False

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (None: nothing); it must be finite and positive."""
        if value is None and self.nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a positive number, got {_describe(value)}"
        if not math.isfinite(value) or value <= 0:
            return f"must be a positive finite number, got {value}"
        return None


@dataclass(frozen=True)
class BoolField:
    """A true/false field of config.json.

    Attributes:
        key: The key.
    """

    key: str

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (None: nothing)."""
        return None if isinstance(value, bool) else f"must be true or false, got {_describe(value)}"


CONFIG_FIELDS: tuple[IntField | FloatField | BoolField, ...] = (
    IntField("vocab_size"),
    IntField("hidden_size"),
    IntField("intermediate_size"),
    IntField("num_hidden_layers"),
    IntField("num_attention_heads"),
    IntField("max_position_embeddings"),
    IntField("num_key_value_heads", nullable=True),
    IntField("head_dim", nullable=True),
    IntField("n_routed_experts", nullable=True),
    IntField("num_experts_per_tok", nullable=True),
    IntField("n_shared_experts", minimum=0, nullable=True),
    IntField("moe_intermediate_size", nullable=True),
    IntField("moe_layer_freq", nullable=True),
    IntField("first_k_dense_replace", minimum=0, nullable=True),
    IntField("n_group", nullable=True),
    IntField("topk_group", nullable=True),
    IntField("kv_lora_rank", nullable=True),
    IntField("q_lora_rank", nullable=True),
    IntField("qk_rope_head_dim", nullable=True),
    IntField("qk_nope_head_dim", minimum=0, nullable=True),
    IntField("qk_head_dim", nullable=True),
    IntField("v_head_dim", nullable=True),
    IntField("num_nextn_predict_layers", minimum=0, nullable=True),
    FloatField("rope_theta"),
    FloatField("rope_parameters.rope_theta"),
    FloatField("rope_parameters.factor", nullable=True),
    FloatField("rope_scaling.factor", nullable=True),
    FloatField("rms_norm_eps"),
    FloatField("routed_scaling_factor", nullable=True),
    BoolField("tie_word_embeddings"),
)
"""Fields of the supported model types checked when present (an absent key takes transformers' default;
``null`` is allowed where transformers accepts it: some DeepSeek-V2 fields default to it)."""

_NESTED_OBJECTS: tuple[str, ...] = ("rope_parameters", "rope_scaling")
_ABSENT = object()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", str: "a string", float: "a float", list: "a list", dict: "an object"}.get(type(value))
    if value is None:
        return "null"
    shown = json.dumps(value) if kind is not None else repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{shown} ({kind})" if kind is not None else shown


def _lookup(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def check_config_types(config: Mapping[str, Any], path: Path) -> None:
    """Check the type, sign and consistency of the numeric fields of a parsed config.json.

    Args:
        config: The parsed ``config.json``.
        path: Its path, named in error messages.

    Raises:
        CheckpointError: A field has the wrong type (a string, a boolean or a float where an
            integer belongs, a non-finite number), a value out of range, or two fields contradict
            each other (more experts per token than experts); the message names the key and ``path``.
    """
    for key in _NESTED_OBJECTS:
        value = config.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise CheckpointError(f"{path}: key '{key}' must be an object or null, got {_describe(value)}")
    for spec in CONFIG_FIELDS:
        value = _lookup(config, spec.key)
        if value is _ABSENT:
            continue
        problem = spec.problem(value)
        if problem is not None:
            raise CheckpointError(f"{path}: key '{spec.key}' {problem}")
    _check_config_relations(config, path)


def _check_config_relations(config: Mapping[str, Any], path: Path) -> None:
    relations = (
        ("num_experts_per_tok", "n_routed_experts", "experts chosen per token cannot exceed the routed experts"),
        ("topk_group", "n_group", "groups chosen per token cannot exceed the expert groups"),
    )
    for small, large, why in relations:
        low, high = config.get(small), config.get(large)
        if _is_int(low) and _is_int(high) and low > high:
            raise CheckpointError(f"{path}: key '{small}' is {low} but '{large}' is {high}: {why}")
    experts, groups = config.get("n_routed_experts"), config.get("n_group")
    if _is_int(experts) and _is_int(groups) and experts % groups:
        raise CheckpointError(
            f"{path}: key 'n_routed_experts' ({experts}) is not a multiple of 'n_group' ({groups})"
        )
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if _is_int(heads) and _is_int(kv_heads) and heads % kv_heads:
        raise CheckpointError(
            f"{path}: key 'num_attention_heads' ({heads}) is not a multiple of 'num_key_value_heads' ({kv_heads})"
        )


# --------------------------------------------------------------------------- the model the config describes


@dataclass(frozen=True)
class ModelFacts:
    """What the model a config.json describes expects, taken from it built on the ``meta`` device.

    Attributes:
        layer_prefix: Name of the decoder layer list (``model.layers``).
        num_layers: Number of decoder layers.
        max_position_embeddings: Longest sequence the model is built for.
        tensors: Every tensor expected on disk, name to shape: fused routed experts as one tensor
            per expert (``mlp.experts.N.{gate,up,down}_proj.weight``), a tied ``lm_head`` left out.
        model: The model on the ``meta`` device (no memory), for checks that walk its modules.
    """

    layer_prefix: str
    num_layers: int
    max_position_embeddings: int | None
    tensors: Mapping[str, tuple[int, ...]]
    model: Any = field(compare=False, repr=False)


def model_facts(config: Mapping[str, Any], path: Path) -> ModelFacts:
    """Build the model of ``config`` on the ``meta`` device and take its facts (no memory, no weights).

    Results are cached per config, so every road through a run pays for this once.

    Args:
        config: A parsed config.json of a supported model type (checked by :func:`check_config_types`).
        path: The config.json path, named in error messages.

    Returns:
        The :class:`ModelFacts`.

    Raises:
        CheckpointError: transformers cannot build a model from the config.
    """
    return _model_facts(json.dumps(config, sort_keys=True), str(path))


@functools.lru_cache(maxsize=8)
def _model_facts(config_json: str, path: str) -> ModelFacts:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsq.core.layout import decoder_layers, tensor_specs

    config = json.loads(config_json)
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config")}
    try:
        pretrained = AutoConfig.for_model(config["model_type"], **kwargs)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(pretrained)
        layer_prefix, layers = decoder_layers(model)
        specs = tensor_specs(config)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError, ZeroDivisionError) as exc:
        raise CheckpointError(f"transformers cannot build the model {path} describes: {exc}") from exc
    max_positions = getattr(pretrained, "max_position_embeddings", None)
    return ModelFacts(
        layer_prefix=layer_prefix,
        num_layers=len(layers),
        max_position_embeddings=max_positions if _is_int(max_positions) else None,
        tensors=MappingProxyType({spec.name: tuple(spec.shape) for spec in specs}),
        model=model,
    )


# --------------------------------------------------------------------------- headers against the config


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a safetensors header describes it.

    Attributes:
        file: The safetensors file that holds it.
        dtype: Its safetensors dtype (``BF16``, ``F8_E4M3`` ...).
        shape: Its shape.
    """

    file: Path
    dtype: str
    shape: tuple[int, ...]


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


def stored_tensors(
    headers: Mapping[Path, Mapping[str, Any]], index: Mapping[str, Any] | None = None
) -> dict[str, StoredTensor]:
    """Every tensor of a checkpoint from its parsed safetensors headers.

    Args:
        headers: File to parsed header (as :func:`dsq.core.checkpoint.read_safetensors_header` returns).
        index: The parsed shard index, if any: a tensor counts in the shard the index names.

    Returns:
        Tensor name to :class:`StoredTensor`.
    """
    weight_map = index.get("weight_map") if index is not None else None
    stored: dict[str, StoredTensor] = {}
    for path, header in headers.items():
        for name, entry in header.items():
            if name == "__metadata__" or (weight_map is not None and weight_map.get(name) != path.name):
                continue
            stored[name] = StoredTensor(path, entry["dtype"], tuple(entry["shape"]))
    return stored


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
        stored: Its tensors (:func:`stored_tensors`).
        facts: The model's facts (:func:`model_facts`).

    Returns:
        The missing and unused tensors and the notes for the report.

    Raises:
        CheckpointError: Headers and config disagree; the message names the tensors (at most
            :data:`MAX_NAMED_KEYS`), their shape in the file and the shape the config implies.
    """
    expected = _align_prefix(facts.tensors, stored)
    layer_prefix = _aligned_name(facts.layer_prefix, expected, facts.tensors)
    mtp_layers = _check_layer_count(root, stored, expected, layer_prefix, facts.num_layers)
    fmt = fp8_format(config)
    problems = [p for name in sorted(stored) if (p := _tensor_problem(name, stored, expected, fmt)) is not None]
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
            f"checkpoint tensors of layer(s) {_ranges(mtp_layers)} beyond num_hidden_layers {num_layers} form a "
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
            f"tensors of decoder layer(s) {_ranges(extra)} ({prefix}.{extra[0]}.*); config.json and the "
            "weights describe different models"
        )
    absent = [index for index in range(num_layers) if index not in layers]
    if absent:
        raise CheckpointError(
            f"checkpoint {root}: config.json num_hidden_layers is {num_layers} but the weights hold no tensor "
            f"of decoder layer(s) {_ranges(absent)} ({prefix}.{absent[0]}.*)"
        )
    return mtp


def _tensor_problem(
    name: str, stored: Mapping[str, StoredTensor], expected: Mapping[str, tuple[int, ...]], fmt: Any
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
    if tensor.dtype == FP8_SAFETENSORS_DTYPE:
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
        described.append(f"{prefix}.{{{_ranges(sorted(indices))}}}.{tail}")
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
        listed = [f"{prefix}.{{{_ranges(extra)}}}.*" for prefix, extra in sorted(beyond.items()) if extra]
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
        if _is_int(value) and value > 0:
            return key, value
    return EXPERT_COUNT_KEYS[0], None


# --------------------------------------------------------------------------- tokenizer


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, config: Mapping[str, Any], root: Path) -> str | None:
    """Check that every token id the tokenizer can emit has a row in the model's embedding.

    Added tokens count (special or not: text and chat templates can contain them). The unknown
    token is the exception: it is emitted only for text the vocabulary cannot encode (a byte-level
    BPE never does), so an unknown token beyond the vocabulary is a note, not an error.

    Args:
        tokenizer: The checkpoint's tokenizer.
        config: Its parsed config.json.
        root: The checkpoint directory (its tokenizer files are named in messages).

    Returns:
        None when the tokenizer fills the vocabulary exactly (or config.json sets no vocab_size);
        otherwise a note for the run's report: fewer tokens than ``vocab_size`` (a padded
        vocabulary, allowed) or an unknown token beyond it.

    Raises:
        CheckpointError: A token id reaches ``vocab_size`` (the tokenizer is larger than the
            vocabulary); the message names both sizes, a few such tokens and the files.
    """
    vocab_size = config.get("vocab_size")
    if not _is_int(vocab_size):
        return None
    ids = {token: index for token, index in tokenizer.get_vocab().items() if token != tokenizer.unk_token}
    beyond = sorted((index, token) for token, index in ids.items() if index >= vocab_size)
    if beyond:
        files = ", ".join(_tokenizer_files(root)) or "its tokenizer files"
        tokens = name_some([f"{token!r} ({index})" for index, token in beyond], ordered=True)
        raise CheckpointError(
            f"the tokenizer of {root} ({files}) has {len(tokenizer)} tokens, added tokens included, but "
            f"{root / 'config.json'} vocab_size is {vocab_size}: {len(beyond)} token id(s) have no embedding row: {tokens}"
        )
    unk_id = tokenizer.unk_token_id if tokenizer.unk_token is not None else None
    if unk_id is not None and unk_id >= vocab_size:
        return (
            f"the tokenizer's unknown token {tokenizer.unk_token!r} (id {unk_id}) is beyond vocab_size {vocab_size} in "
            "config.json: text the tokenizer cannot encode would fail (a byte-level BPE encodes every text)"
        )
    size = 1 + max(ids.values(), default=-1)
    if size < vocab_size:
        return (
            f"the tokenizer has {size} tokens, fewer than vocab_size {vocab_size} in config.json: "
            f"embedding rows {size} to {vocab_size - 1} are never used (a padded vocabulary)"
        )
    return None


def _tokenizer_files(root: Path) -> list[str]:
    stems = ("tokenizer", "added_tokens", "special_tokens_map", "vocab.", "merges.", "tiktoken")
    try:
        return sorted(p.name for p in root.iterdir() if p.is_file() and p.name.startswith(stems))
    except OSError:
        return []


# --------------------------------------------------------------------------- the recipe against the model


# --------------------------------------------------------------------------- message helpers


def name_some(names: Iterable[str], *, ordered: bool = False) -> str:
    """At most :data:`MAX_NAMED_KEYS` names, then how many more.

    Args:
        names: The names (or short descriptions).
        ordered: Keep the given order (default: sorted).

    Returns:
        ``"a, b, c"`` or ``"a, ..., j (and 5 more)"``.
    """
    listed = list(names) if ordered else sorted(names)
    shown = ", ".join(listed[:MAX_NAMED_KEYS])
    rest = len(listed) - MAX_NAMED_KEYS
    return shown + (f" (and {rest} more)" if rest > 0 else "")


def _ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts: list[str] = []
    start = prev = None
    for index in indices:
        if prev is not None and index == prev + 1:
            prev = index
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        start = prev = index
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(parts)
