"""What a checkpoint of a config holds: the tensors on disk and the decoder layer list.

Derived from the model transformers builds on the ``meta`` device, so names and shapes are
transformers' own. The ground floor's model of a checkpoint's layout: checkpoint checks, synthetic
checkpoints and the plan all read it.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dsq.core.errors import QuantizationError

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("deepseek_v4", "deepseek_v32", "deepseek_v3", "deepseek_v2", "llama", "qwen2")
"""The ``model_type`` values dsq reads."""

KINDS: tuple[str, ...] = ("embedding", "linear", "expert", "lm_head", "norm", "router", "router_bias", "bias", "index", "other")
"""What a tensor is: ``linear`` is a Linear weight inside a decoder layer (other than the router),
``expert`` one routed expert's projection; both are stored as FP8 in an FP8 checkpoint. ``index`` is an
integer table (DeepSeek-V4's hash router ``tid2eid``: token id -> experts)."""


FP8_KINDS: frozenset[str] = frozenset({"linear", "expert"})
"""Kinds stored as float8_e4m3fn + ``weight_scale_inv`` in FP8 checkpoints (as DeepSeek-V3/R1)."""


_FUSED_EXPERT_PARAMS: tuple[str, ...] = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a checkpoint as stored on disk (before any FP8 conversion).

    Attributes:
        name: On-disk name, e.g. ``model.layers.3.mlp.experts.7.up_proj.weight``.
        shape: Its shape.
        kind: One of :data:`KINDS`.
    """

    name: str
    shape: tuple[int, ...]
    kind: str

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def _pretrained_config(config: Mapping[str, Any]) -> Any:
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config")}
    return CONFIG_MAPPING[model_type](**kwargs)


def _kind(name: str, module: torch.nn.Module, output_embeddings: torch.nn.Module | None,
          tensor: torch.Tensor | None = None) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if tensor is not None and not tensor.dtype.is_floating_point:
        return "index"
    cls = type(module).__name__
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if output_embeddings is not None and module is output_embeddings:
        return "lm_head"
    if cls.endswith(("RMSNorm", "LayerNorm")) or isinstance(module, torch.nn.LayerNorm):
        return "norm"
    if "Router" in cls or name.endswith("mlp.gate.weight") or name.endswith("mlp.gate.e_score_correction_bias"):
        return "router_bias" if leaf != "weight" else "router"
    if isinstance(module, torch.nn.Linear):
        return "linear" if leaf == "weight" else "bias"
    return "other"


def _split_fused(name: str, shape: tuple[int, ...]) -> list[TensorSpec]:
    """Fused expert parameter -> per-expert on-disk tensors (as ``split_fused_experts`` writes)."""
    prefix, param = name.rsplit(".", 1)
    if param == "gate_up_proj":  # (E, 2I, H) -> gate_proj and up_proj (I, H) per expert
        experts, two_inter, hidden = shape
        inter = two_inter // 2
        return [
            TensorSpec(f"{prefix}.{e}.{proj}.weight", (inter, hidden), "expert")
            for e in range(experts)
            for proj in ("gate_proj", "up_proj")
        ]
    experts, hidden, inter = shape  # down_proj (E, H, I) -> (H, I) per expert
    return [TensorSpec(f"{prefix}.{e}.down_proj.weight", (hidden, inter), "expert") for e in range(experts)]


def tensor_specs(config: Mapping[str, Any]) -> list[TensorSpec]:
    """The tensors a checkpoint of ``config`` holds on disk, in model order, as transformers expects.

    Derived from the model instantiated on the meta device (no memory), so the names and shapes
    are transformers' own. Fused routed experts (``mlp.experts.gate_up_proj`` [E, 2I, H] and
    ``mlp.experts.down_proj`` [E, H, I]) become ``mlp.experts.N.{gate,up,down}_proj.weight``, the
    layout of DeepSeek's checkpoints; a tied ``lm_head`` is left out.

    Args:
        config: A ``config.json`` dict of a supported model type.

    Returns:
        One :class:`TensorSpec` per stored tensor (an FP8 weight's scale is not listed).

    Raises:
        ValueError: Unsupported model type, or a fused parameter this module cannot split.

    Example:
        >>> import json
        >>> cfg = json.loads((bundled_model_path() / "config.json").read_text())
        >>> tensor_specs(cfg)[0]
        TensorSpec(name='model.embed_tokens.weight', shape=(2048, 256), kind='embedding')
    """
    from transformers import AutoModelForCausalLM

    pretrained = _pretrained_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(pretrained)
    modules = dict(model.named_modules())
    output_embeddings = model.get_output_embeddings()
    tied: set[str] = set()
    if getattr(pretrained.get_text_config(), "tie_word_embeddings", False):
        tied = set(getattr(model, "_tied_weights_keys", None) or {"lm_head.weight": None})
    specs: list[TensorSpec] = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in tied:
            continue
        shape = tuple(tensor.shape)
        module_name, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        module = modules[module_name]
        fused = tensor.dim() == 3 and module_name.endswith("experts")
        if fused and leaf not in _FUSED_EXPERT_PARAMS:
            raise ValueError(f"cannot name the on-disk tensors of fused expert parameter {name} {shape}")
        if pretrained.model_type in OWN_DISK_NAMES:
            kind = "expert" if fused else _kind(name, module, output_embeddings, tensor)
            specs.extend(TensorSpec(n, s, kind) for n, s in disk_names(model, name, tensor))
        elif fused:
            specs.extend(_split_fused(name, shape))
        else:
            specs.append(TensorSpec(name, shape, _kind(name, module, output_embeddings, tensor)))
    return specs


OWN_DISK_NAMES: frozenset[str] = frozenset({"deepseek_v4"})
"""Model types whose checkpoints keep the official tensor names (``layers.N.attn.wq_a``, ``ffn.experts.E.w1``,
``hc_attn_fn``...), which transformers renames on load (its ``conversion_mapping``); dsq names their on-disk
tensors with transformers' own reverse renaming."""


@dataclass(frozen=True)
class ExpertProjections:
    """On-disk names of one routed expert's projections (``<experts>.<e>.<name>.weight``).

    ``gate`` and ``up`` are the two halves of the fused ``gate_up_proj`` [E, 2I, H] (gate rows first);
    ``down`` is ``down_proj`` [E, H, I].
    """

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    @property
    def names(self) -> tuple[str, str, str]:
        return self.gate, self.up, self.down

    @property
    def pattern(self) -> str:
        """``gate|up|down`` for a regular expression."""
        return "|".join(self.names)


_EXPERT_PROJECTIONS: Mapping[str, ExpertProjections] = {"deepseek_v4": ExpertProjections("w1", "w3", "w2")}


def expert_projections(model_or_type: nn.Module | str | None) -> ExpertProjections:
    """The expert projection names a model type's checkpoints use (DeepSeek-V4: ``w1``/``w3``/``w2``).

    Args:
        model_or_type: a ``model_type``, or a model (its ``config.model_type``), or None (the default names).
    """
    if isinstance(model_or_type, nn.Module):
        model_or_type = getattr(getattr(model_or_type, "config", None), "model_type", None)
    return _EXPERT_PROJECTIONS.get(model_or_type, ExpertProjections()) if isinstance(model_or_type, str) else ExpertProjections()


_LAYER_INDEX = re.compile(r"(?<=layers\.)\d+(?=\.)")


def disk_names(model: nn.Module, name: str, tensor: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """On-disk ``(name, shape)`` of the model parameter ``name`` as transformers saves it (fused experts: one per expert).

    ``tensor`` may be on the meta device. The renaming depends on the name only, so it is computed once per
    layer-independent name (``layers.N`` replaced) and per expert count: a V4-Pro config's thousands of
    tensors cost a few dozen reverse renamings.
    """
    template = _LAYER_INDEX.sub("0", name)
    layer = _LAYER_INDEX.search(name)
    experts = tensor.shape[0] if tensor.dim() == 3 else 0
    renamed = _reverted_names(model, template, experts)
    names = [n if layer is None else _LAYER_INDEX.sub(layer.group(0), n, count=1) for n in renamed]
    if not experts:
        return [(n, tuple(tensor.shape)) for n in names]
    _, rows, cols = tensor.shape  # gate_up (E, 2I, H): each of the two halves (I, H); down (E, H, I): (H, I)
    per_expert = len(names) // experts
    shape = (rows // per_expert, cols)
    return [(n, shape) for n in names]


_REVERTED: dict[tuple[type, str, str, int], tuple[str, ...]] = {}


def _reverted_names(model: nn.Module, template: str, experts: int) -> tuple[str, ...]:
    """transformers' reverse renaming of one parameter name (a fused experts tensor of ``experts`` experts).

    Cached per model class and type: the renaming rules are transformers' per-model-type conversion mapping.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    key = (type(model), model_type, template, experts)
    if key not in _REVERTED:
        from transformers.core_model_loading import revert_weight_conversion

        probe = torch.empty((experts, 2, 1) if experts else (1,), device="meta")
        _REVERTED[key] = tuple(revert_weight_conversion(model, {template: probe}))
    return _REVERTED[key]


def num_parameters(specs: list[TensorSpec]) -> int:
    """Total elements of ``specs`` (the model's parameter count; FP8 scales not included)."""
    return sum(s.numel for s in specs)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Name and module list of the decoder layers (``model.layers`` in every supported architecture)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and (count is None or len(module) == count):
            return name, module
    raise QuantizationError(f"{type(model).__name__}: no decoder layer list found (expected 'model.layers')")


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) of ``model`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
