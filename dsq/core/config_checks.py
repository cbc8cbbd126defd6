"""config.json checked before any weight is read: field types, and the model it describes.

* :func:`check_config_types`: the numeric fields of ``config.json`` have the right type and sign.
* :func:`model_facts`: the model ``config.json`` describes, built on the ``meta`` device (no memory):
  the tensors it expects on disk (fused MoE experts split one tensor per expert, as DeepSeek's
  checkpoints store them; a tied ``lm_head`` left out), its decoder layers, its quantizable modules.
* :func:`name_some`, :func:`index_ranges`: the short lists error messages name.

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
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dsq.core.errors import CheckpointError

MAX_NAMED_KEYS = 10
"""How many offending tensor names an error message lists."""

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
        if not is_int(value):
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


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (a boolean is not)."""
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
        if is_int(low) and is_int(high) and low > high:
            raise CheckpointError(f"{path}: key '{small}' is {low} but '{large}' is {high}: {why}")
    experts, groups = config.get("n_routed_experts"), config.get("n_group")
    if is_int(experts) and is_int(groups) and experts % groups:
        raise CheckpointError(
            f"{path}: key 'n_routed_experts' ({experts}) is not a multiple of 'n_group' ({groups})"
        )
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if is_int(heads) and is_int(kv_heads) and heads % kv_heads:
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
        integer_tensors: Expected tensors the model holds as integers (DeepSeek-V4's hash-routing table
            ``tid2eid``); every other tensor must be floating point.
    """

    layer_prefix: str
    num_layers: int
    max_position_embeddings: int | None
    tensors: Mapping[str, tuple[int, ...]]
    model: Any = field(compare=False, repr=False)
    integer_tensors: frozenset[str] = frozenset()


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
        max_position_embeddings=max_positions if is_int(max_positions) else None,
        tensors=MappingProxyType({spec.name: tuple(spec.shape) for spec in specs}),
        model=model,
        integer_tensors=frozenset(spec.name for spec in specs if spec.kind == "index"),
    )


# --------------------------------------------------------------------------- message parts


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


def index_ranges(indices: Sequence[int]) -> str:
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
