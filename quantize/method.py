"""The method registry: everything the edge of dsq knows about a quantization method, in one place.

A method is one module under :mod:`dsq.quantize.methods`. It defines its recipe section (a
:class:`~dsq.quantize.sections.MethodSection` whose ``method`` literal is its name), its config
class (what :func:`~dsq.quantize.quantize_` dispatches on), its handler, and registers a
:class:`Method` naming what the recipe, the run, the export and the plan need to know about it.
The recipe's ``quantize:`` section is the discriminated union of the registered sections.

Example:
    >>> from dsq.quantize.method import METHODS, method_of
    >>> METHODS["gptq"].calibrates(METHODS["gptq"].config())
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .api import QuantizationReport
    from .cost import MethodCost
    from .sections import MethodSection
    from .sequential import LayerLifecycle

Handler = Callable[["nn.Module", Any, "torch.Tensor | None", bool, "LayerLifecycle"], "QuantizationReport"]
"""``(model, config, calibration, progress, lifecycle) -> report``: quantizes ``model`` in place."""

Saver = Callable[..., None]
"""``(model, tokenizer, root, *, dtype_name, max_shard_bytes)``: writes the artifact's weights, config and tokenizer."""

TOLERANCE = 1e-4
"""Largest logit difference between dsq's model and transformers' reload of its artifact."""


def _never(config: Any) -> bool:
    return False


def _always(config: Any) -> bool:
    return True


@dataclass(frozen=True)
class Method:
    """A registered quantization method.

    Attributes:
        name: Its name in a recipe (``quantize.method``).
        section: Its recipe section class; ``section.config(dtype)`` builds ``config``.
        config: The config class :func:`~dsq.quantize.quantize_` dispatches on.
        handler: Quantizes a model in place with a ``config``.
        save: Writes a model it quantized as an artifact.
        calibrates: Whether a given config needs calibration token ids.
        streams: It can quantize one decoder layer at a time from the checkpoint's shards.
        exports: Its artifacts have an ONNX form.
        qat_start: QAT may start from it (dsq's integer weight formats).
        lora_base: LoRA may train on a model it quantized (QLoRA).
        moves_layers: It honours ``quantize.device`` (each layer quantized on that device).
        splits_calibration: Several processes (``torchrun``) can share its calibration: each runs its share of
            the batches, the statistics are combined and the solves dealt out; the artifact is the one-process one.
        mixed_schemes: It quantizes each module with its own scheme (``TargetSpec.schemes``, mixed precision).
        reload_tolerance: Largest logit difference allowed between dsq's model and transformers' reload.
        cost: What the plan needs to estimate its memory and time (:mod:`dsq.quantize.cost`).
    """

    name: str
    section: type[MethodSection]
    config: type
    handler: Handler
    save: Saver
    cost: MethodCost = field(compare=False)
    calibrates: Callable[[Any], bool] = _never
    streams: bool = False
    exports: bool = False
    qat_start: bool = False
    lora_base: bool = False
    moves_layers: bool = True
    splits_calibration: bool = False
    mixed_schemes: bool = False
    reload_tolerance: float = TOLERANCE


METHODS: dict[str, Method] = {}
"""Registered methods by recipe name, in registration order."""

_BY_CONFIG: dict[type, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (one registration per name and per config class)."""
    if method.name in METHODS or method.config in _BY_CONFIG:
        raise ValueError(f"quantization method {method.name!r} ({method.config.__name__}) is registered twice")
    METHODS[method.name] = method
    _BY_CONFIG[method.config] = method
    return method


def split_refusal(config: object, processes: int) -> str | None:
    """Why ``processes`` processes cannot share ``config``'s calibration, or None when they can."""
    method = method_of(config)
    if not method.splits_calibration:
        allowed = ", ".join(method_names(lambda m: m.splits_calibration))
        return f"{processes} processes: quantize.method {method.name!r} cannot split its calibration; methods that can: {allowed}"
    if not method.calibrates(config):
        return f"{processes} processes share calibration, and this quantize section calibrates nothing (run it in one process)"
    return None


def mixed_refusal(config: object) -> str | None:
    """Why ``config``'s per-module scheme rules cannot be honoured by its method, or None when they can."""
    targets = getattr(config, "targets", None)
    method = method_of(config)
    if targets is None or not targets.schemes or method.mixed_schemes:
        return None
    allowed = ", ".join(method_names(lambda m: m.mixed_schemes))
    return (f"quantize.targets.schemes: quantize.method {method.name!r} quantizes every module with one scheme; "
            f"methods with per-module schemes: {allowed}")


def method_of(config: object) -> Method:
    """The registered method whose config class ``config`` is.

    Raises:
        TypeError: ``config`` is not the config of a registered method.
    """
    method = _BY_CONFIG.get(type(config))
    if method is None:
        known = ", ".join(m.config.__name__ for m in METHODS.values())
        raise TypeError(f"no quantization method for {type(config).__name__}; known configs: {known}")
    return method


def method_names(predicate: Callable[[Method], bool] = lambda m: True) -> tuple[str, ...]:
    """Names of the registered methods for which ``predicate`` holds, in registration order."""
    return tuple(name for name, m in METHODS.items() if predicate(m))


ALWAYS = _always
"""``calibrates`` of a method that always needs calibration tokens."""
