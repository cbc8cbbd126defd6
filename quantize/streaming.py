"""Streaming quantization: a checkpoint larger than memory, one decoder layer at a time.

The model is built without weights (every tensor on the ``meta`` device). The tensors outside
the decoder layers (embeddings, final norm, lm_head, rotary tables) are read from the shards
and stay resident. The method then walks the layers through a :class:`StreamedLayers`
lifecycle: on ``load`` the layer's tensors are read from the safetensors shards through memory
maps (FP8 block-scaled weights are dequantized on the way, fused experts are assembled from
their per-expert tensors); on ``release`` the quantized layer is converted to compressed-tensors
tensors, appended to the output shards and returned to ``meta``. Peak memory is the resident
non-layer tensors, one layer and its calibration activations, whatever the depth.

The tensors written are exactly those of the in-memory path (:func:`dsq.quantize.artifact_save.save_quantized_model`):
the same modules are quantized with the same math in the same order.

Example:
    >>> result = quantize_streaming(Path("ckpt"), Path("out"), RTNConfig(WeightScheme(4, PerGroup(128))))
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dsq import __version__
from dsq.core.checkpoint import CheckpointFiles, inspect_checkpoint
from dsq.core.errors import CheckpointError, QuantizationError
from dsq.core.fp8 import fp8_format
from dsq.core.layout import expert_projections
from dsq.core.shards import DEFAULT_MAX_SHARD_BYTES, ShardedTensors, ShardWriter, module_state
from dsq.core.tied import drop_tied_duplicate, tie_notes, tied_embeddings, untie_config
from dsq.core.layered import _holder, _return_freed_memory, build_skeleton, materialize_outside_layers

from .compressed_tensors_format import Compressor
from .sequential import OnDevice, decoder_layers

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------- the lifecycle


# ----------------------------------------------------------------------------- the run


@dataclass
class StreamedLayers:
    """Loads each decoder layer from the shards and writes it out quantized (a ``LayerLifecycle``).

    Attributes:
        source: where the checkpoint's tensors are.
        compressor: turns a quantized layer into compressed-tensors tensors and gathers the config.
        writer: the output shards.
        seconds_reading: wall time spent reading (and dequantizing) layers.
        seconds_writing: wall time spent converting and writing layers.
    """

    source: ShardedTensors
    compressor: object
    writer: ShardWriter | None  # None: a process that only calibrates (another one writes)
    seconds_reading: float = 0.0
    seconds_writing: float = 0.0
    layers_written: int = 0
    _originals: dict[int, list[nn.Module]] = field(default_factory=dict)

    resident = False

    def load(self, index: int, name: str, layer: nn.Module) -> None:
        started = time.perf_counter()
        with self.source.reader() as read:
            state = module_state(layer, name, read)
        layer.load_state_dict(state, strict=True, assign=True)
        del state
        left = [n for n, t in (*layer.named_parameters(), *layer.named_buffers()) if t.is_meta]
        if left:
            raise CheckpointError(f"{name}: no value read for {', '.join(left[:5])}")
        self._originals[index] = list(layer.modules())  # swapped-out originals still hold tensors
        self.seconds_reading += time.perf_counter() - started

    def release(self, index: int, name: str, layer: nn.Module) -> None:
        started = time.perf_counter()
        if self.writer is not None:
            self.writer.add(self.compressor.add(_holder(name, layer)))
        for module in (*self._originals.pop(index, ()), *layer.modules()):
            module.to("meta")
        _return_freed_memory()
        self.layers_written += 1
        self.seconds_writing += time.perf_counter() - started


@dataclass
class StreamedArtifact:
    """What :func:`quantize_streaming` wrote and measured."""

    report: object
    files: list[str]
    seconds: float
    seconds_reading: float
    seconds_writing: float
    unused_tensors: list[str]
    config: dict


def experts_quantized(model: nn.Module, targets) -> bool:
    from dsq.quantize.targets import select_targets

    return any(d.kind == "experts" and d.quantize for d in select_targets(model, targets))


def quantize_streaming(
    src: Path | CheckpointFiles,
    out: Path | None,
    config: object,
    *,
    calibration: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> StreamedArtifact:
    """Quantize the checkpoint ``src`` layer by layer into the existing, empty directory ``out``.

    Args:
        src: a local checkpoint directory (safetensors shards, BF16/FP32 or FP8 block-scaled), or its
            :class:`~dsq.core.checkpoint.CheckpointFiles` already inspected (its headers are not read again).
        out: where the weights and config.json are written (the caller adds tokenizer and manifest); None: nothing
            is written (a process of a multi-process run that only calibrates; the main one writes).
        config: the config of a method that streams (``Method.streams``: RTN, GPTQ, AWQ).
        calibration: ``(samples, seq_len)`` token ids for calibrated methods.
        dtype: the working dtype of the model (as the in-memory path's ``dtype``).
        trust_remote_code: passed to transformers for the config and model class.
        max_shard_bytes: output shard size.
        progress: show progress bars.
        device: where each layer is calibrated and quantized (e.g. ``"cuda"``); None: on CPU.

    Returns:
        A :class:`StreamedArtifact`.
    """
    from dsq.quantize import quantize_
    from dsq.quantize.method import method_names, method_of

    if not method_of(config).streams:
        raise QuantizationError(
            f"{type(config).__name__} cannot be streamed; streaming supports {', '.join(method_names(lambda m: m.streams))}"
        )
    started = time.perf_counter()
    files = src if isinstance(src, CheckpointFiles) else inspect_checkpoint(src, allow_unsupported=trust_remote_code)
    source = ShardedTensors(files, fp8=fp8_format(files.config))
    model = build_skeleton(files.root, dtype=dtype, trust_remote_code=trust_remote_code)
    prefix, layers = decoder_layers(model)
    materialize_outside_layers(model, prefix, source)
    compressor = Compressor(__version__, has_experts=experts_quantized(model, config.targets), experts=expert_projections(model))
    writer = ShardWriter(out, max_shard_bytes) if out is not None else None
    lifecycle = StreamedLayers(source, compressor, writer)
    on = OnDevice(lifecycle, device) if device is not None else lifecycle
    report = quantize_(model, config, calibration=calibration, progress=progress, lifecycle=on)
    if lifecycle.layers_written != len(layers):
        raise QuantizationError(f"streaming wrote {lifecycle.layers_written} of {len(layers)} decoder layers")
    tie = tied_embeddings(model)
    names = []
    if writer is not None:
        writer.add(drop_tied_duplicate(_outside_layers(model, prefix, compressor), tie))
        names = writer.close()
    report.notes += tie_notes(model)
    unused = source.unused()
    report.notes += _stream_notes(unused, files.root, len(layers))
    return StreamedArtifact(
        report=report, files=names, seconds=time.perf_counter() - started, seconds_reading=lifecycle.seconds_reading,
        seconds_writing=lifecycle.seconds_writing, unused_tensors=unused,
        config=_artifact_config(model, tie, compressor, dtype),
    )


def _artifact_config(model: nn.Module, tie, compressor: Compressor, dtype: torch.dtype) -> dict:
    """config.json of the streamed artifact: the model's config, untied if the tie was broken, with its quantization_config."""
    config_dict = untie_config(model.config.to_dict(), tie)
    config_dict["quantization_config"] = compressor.quantization_config()
    config_dict["dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, str(dtype).removeprefix("torch."))
    return config_dict


def _stream_notes(unused: list[str], root: Path, num_layers: int) -> list[str]:
    notes = []
    if unused:
        notes.append(
            f"{len(unused)} checkpoint tensor(s) are not used by the transformers model and were not written "
            f"(e.g. {', '.join(unused[:3])})"
        )
    notes.append(f"streamed: one decoder layer at a time from {root} ({num_layers} layers)")
    return notes


def _outside_layers(model: nn.Module, prefix: str, compressor) -> dict[str, torch.Tensor]:
    """Tensors of everything outside the decoder layers (embeddings, norm, lm_head)."""
    from dsq.quantize.modules import set_module

    layers = model.get_submodule(prefix)
    set_module(model, prefix, nn.ModuleList())
    try:
        return compressor.add(model)
    finally:
        set_module(model, prefix, layers)


# ----------------------------------------------------------------------------- when to stream


