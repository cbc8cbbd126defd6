"""A model directory as a user hands it to ``dsq export`` or ``dsq validate``: an fp checkpoint or a dsq artifact."""
from __future__ import annotations

import json
from pathlib import Path

from dsq.core.errors import CheckpointError
from dsq.core.loading import LoadedModel, load_checkpoint

from .artifact_load import load_artifact


def _quantization_config(path: Path) -> dict | None:
    """``config.json``'s ``quantization_config`` (None for an fp checkpoint).

    Raises:
        CheckpointError: no readable ``config.json`` object, or a ``quantization_config`` that is not an object.
    """
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json; not a model directory")
    try:
        config = json.loads(config_file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file}: not valid UTF-8 JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: not a JSON object")
    qconfig = config.get("quantization_config")
    if qconfig is not None and not isinstance(qconfig, dict):
        raise CheckpointError(f"{config_file}: quantization_config must be an object, got {type(qconfig).__name__}")
    return qconfig or None


def load_for_export(path: Path) -> LoadedModel:
    """An fp checkpoint (transformers) or a dsq compressed-tensors artifact (dsq's own modules).

    Raises:
        CheckpointError: no readable ``config.json``, a quantization method dsq cannot read, or an
            artifact that does not load (see :func:`dsq.quantize.artifact_load.load_artifact`).
    """
    qconfig = _quantization_config(path)
    if qconfig is None:
        return load_checkpoint(path)
    config_file = path / "config.json"
    method = qconfig.get("quant_method")
    if method != "compressed-tensors":
        raise CheckpointError(
            f"{config_file}: quantization_config.quant_method {method!r} has no ONNX form; "
            "dsq exports fp checkpoints and dsq (compressed-tensors) artifacts"
        )
    return load_artifact(path)
