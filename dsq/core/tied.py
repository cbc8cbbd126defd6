"""Tied input/output embeddings (``tie_word_embeddings: true``) in the files dsq writes.

A tied model's ``lm_head.weight`` is the input embedding's tensor. safetensors refuses to save two
names for one tensor, and transformers writes it once: under the embedding's name, with
``tie_word_embeddings: true`` in config.json, and ties ``lm_head`` to it again on load. dsq does the
same while ``lm_head`` is still that tensor (``quantize.targets.lm_head: false``, the default). When
``lm_head`` is quantized the embedding stays in high precision and the two are different tensors:
both are written and config.json says ``tie_word_embeddings: false``, with a note in the report.

Example:
    >>> tie = tied_embeddings(model)
    >>> tensors = drop_tied_duplicate(tensors, tie)
    >>> config = untie_config(model.config.to_dict(), tie)
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

TIE_KEY = "tie_word_embeddings"


@dataclass(frozen=True)
class TiedEmbeddings:
    """A model whose config ties ``lm_head`` to the input embedding.

    Attributes:
        input_name: the input embedding's weight (``model.embed_tokens.weight``).
        output_name: the output projection's weight (``lm_head.weight``).
        kept: ``lm_head`` is still the embedding's tensor (written once); False when it was
            quantized or replaced (both written, the tie dropped from config.json).
    """

    input_name: str
    output_name: str
    kept: bool

    def note(self) -> str | None:
        """The report's note when the tie is broken (None while it is kept)."""
        if self.kept:
            return None
        return (
            f"tied embeddings untied: {self.output_name.rpartition('.')[0]} was quantized while "
            f"{self.input_name} stays in high precision, so they are no longer one tensor; both are written "
            f"and config.json says {TIE_KEY}: false"
        )


def _config_ties(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, TIE_KEY, False))


def _unwrap(module: nn.Module | None) -> nn.Module | None:
    """The Linear inside a wrapper (peft's LoRA layer keeps it as ``base_layer``)."""
    while module is not None and hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def tied_embeddings(model: nn.Module) -> TiedEmbeddings | None:
    """Whether ``model``'s config ties its embeddings, and whether ``lm_head`` still shares the tensor.

    Args:
        model: a transformers causal LM (possibly with quantized or wrapped modules).

    Returns:
        The tie, or None when the config does not tie (or the model has no output embedding).
    """
    if not _config_ties(model) or not hasattr(model, "get_output_embeddings"):
        return None
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    if id(inputs) not in names or id(outputs) not in names:
        return None
    weight = getattr(_unwrap(outputs), "weight", None)
    kept = weight is not None and weight is inputs.weight
    return TiedEmbeddings(f"{names[id(inputs)]}.weight", f"{names[id(outputs)]}.weight", kept)


def drop_tied_duplicate(tensors: dict, tie: TiedEmbeddings | None) -> dict:
    """``tensors`` without ``lm_head.weight`` when it is the embedding's tensor (written once).

    Args:
        tensors: name -> tensor, as about to be written.
        tie: from :func:`tied_embeddings`.

    Returns:
        The tensors to write (the same dict when nothing is dropped).
    """
    if tie is None or not tie.kept or tie.output_name not in tensors or tie.input_name not in tensors:
        return tensors
    return {k: v for k, v in tensors.items() if k != tie.output_name}


def untie_config(config: dict, tie: TiedEmbeddings | None) -> dict:
    """``config`` (a config.json dict) with ``tie_word_embeddings: false`` where the tie is broken.

    Args:
        config: the config as a dict (nested ``text_config`` included).
        tie: from :func:`tied_embeddings`.

    Returns:
        The config to write (the same dict when the tie is kept or absent).
    """
    if tie is None or tie.kept:
        return config
    out = {**config, TIE_KEY: False}
    if isinstance(config.get("text_config"), dict):
        out["text_config"] = {**config["text_config"], TIE_KEY: False}
    return out


def tie_notes(model: nn.Module) -> list[str]:
    """The quantization report's notes about ``model``'s tied embeddings (one when the tie is broken).

    Args:
        model: the quantized model, before it is saved.

    Returns:
        Zero or one note.
    """
    tie = tied_embeddings(model)
    note = tie.note() if tie is not None else None
    return [note] if note else []
