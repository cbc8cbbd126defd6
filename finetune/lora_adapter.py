"""LoRA adapter files: peft's ``adapter_config.json`` + ``adapter_model.safetensors`` and dsq's manifest.

:func:`save_adapter` writes an adapter atomically (a temporary sibling directory renamed at the end)
with ``adapter_manifest.json``, which records the exact targets, rank, alpha and the identity of the
base it was trained on; :func:`load_adapter` checks all of them before wrapping a base model.
Only safetensors weights are read or written.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dsq.core.errors import CheckpointError

from .lora_peft import _peft_conversion_disabled, _wrap, adapted_modules, trainable_share
from .lora_targets import LoraSpec, LoraTargetError, _check_adaptable, _refuse_peft_model, _split_targets, import_peft

if TYPE_CHECKING:  # pragma: no cover
    import peft

ADAPTER_NAME = "default"
MANIFEST_NAME = "adapter_manifest.json"
MANIFEST_VERSION = 1
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _check_identity(base_identity: Any) -> dict:
    if not isinstance(base_identity, dict) or not all(isinstance(k, str) for k in base_identity):
        raise ValueError(f"base_identity must be a dict with string keys, got {base_identity!r}")
    try:
        return json.loads(json.dumps(base_identity))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"base_identity must be JSON-serializable: {exc}") from exc


def _manifest(peft_model: nn.Module, base_identity: dict) -> dict:
    config = peft_model.peft_config[ADAPTER_NAME]
    return {
        "version": MANIFEST_VERSION,
        "base": base_identity,
        "targets": sorted(adapted_modules(peft_model)),
        "r": int(config.r),
        "alpha": float(config.lora_alpha),
        "dropout": float(config.lora_dropout),
        "trainable_params": trainable_share(peft_model)[0],
    }


def _single_adapter(peft_model: nn.Module) -> None:
    peft = import_peft()
    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"expected a peft.PeftModel, got {type(peft_model).__name__}")
    if list(peft_model.peft_config) != [ADAPTER_NAME]:
        raise ValueError(f"expected one adapter named {ADAPTER_NAME!r}, got {list(peft_model.peft_config)}")


def save_adapter(peft_model: "peft.PeftModel", out_dir: Path, base_identity: dict, *, overwrite: bool = False) -> list[Path]:
    """Write the adapter in peft format plus dsq's ``adapter_manifest.json``.

    Everything is written into a temporary sibling directory that is renamed to ``out_dir`` at the
    end, so a failure leaves no partial adapter behind.

    Args:
        peft_model: a model from :func:`~dsq.finetune.lora.apply_lora` / :func:`load_adapter` (one
            adapter).
        out_dir: directory to create.
        base_identity: what the adapter was trained on (JSON-serializable dict, e.g. checkpoint
            hash and quantization scheme); :func:`load_adapter` compares it.
        overwrite: replace an existing ``out_dir`` (otherwise an existing non-empty one is an error).

    Returns:
        The written files (in ``out_dir``), sorted: ``adapter_config.json``,
        ``adapter_model.safetensors``, ``adapter_manifest.json`` (and peft's README.md).

    Raises:
        FileExistsError: ``out_dir`` exists, is not empty and ``overwrite`` is False.
        CheckpointError: peft wrote pickle weights or no safetensors.
    """
    _single_adapter(peft_model)
    identity = _check_identity(base_identity)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_adapter(peft_model, tmp, identity)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(out_dir / p.name for p in out_dir.iterdir())


def _write_adapter(peft_model: Any, tmp: Path, identity: dict) -> None:
    tmp.mkdir(parents=True)
    peft_model.save_pretrained(str(tmp), safe_serialization=True)
    _check_safetensors_only(tmp)
    manifest = _manifest(peft_model, identity)
    _write_exact_targets(tmp / ADAPTER_CONFIG_NAME, manifest["targets"])
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_exact_targets(config_path: Path, targets: list[str]) -> None:
    """Record the exact module names in ``adapter_config.json``.

    peft shortens 20 or more targets to their common suffixes (``gate_proj`` ...), which on a
    DeepSeek model other readers would map onto the fused experts; the full names are unambiguous.
    """
    config = json.loads(config_path.read_text(encoding="utf-8"))
    params = set(config.get("target_parameters") or [])
    config["target_modules"] = sorted(t for t in targets if t not in params)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``, moving an existing ``out_dir`` aside first."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError:
        if old is not None:
            old.rename(out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_safetensors_only(root: Path) -> None:
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{root} holds pickle adapter files {pickles}; only safetensors are allowed")
    if not (root / ADAPTER_WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{root} has no {ADAPTER_WEIGHTS_NAME}")
    if not (root / ADAPTER_CONFIG_NAME).is_file():
        raise CheckpointError(f"{root} has no {ADAPTER_CONFIG_NAME}")


def read_manifest(adapter_dir: Path) -> dict:
    """Read and validate ``adapter_manifest.json`` (unknown keys are tolerated with a warning).

    Raises:
        CheckpointError: the file is missing, unreadable, of an unsupported version or lacks a field.
    """
    path = Path(adapter_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{adapter_dir} has no {MANIFEST_NAME}; it was not written by dsq.save_adapter") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{path}: unsupported manifest version {version!r} (this dsq reads {MANIFEST_VERSION})")
    required = {"version", "base", "targets", "r", "alpha", "trainable_params"}
    missing = sorted(required - manifest.keys())
    if missing:
        raise CheckpointError(f"{path} lacks field(s) {missing}")
    targets = manifest["targets"]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise CheckpointError(f"{path}: targets must be a non-empty list of names, got {targets!r}")
    unknown = sorted(manifest.keys() - required - {"dropout"})
    if unknown:
        warnings.warn(f"{path}: ignoring unknown manifest key(s) {unknown}", stacklevel=2)
    return manifest


def _check_config_agrees(adapter_dir: Path, manifest: dict) -> None:
    """peft's ``adapter_config.json`` must name the manifest's targets, rank and alpha."""
    path = adapter_dir / ADAPTER_CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    names = set(config.get("target_modules") or []) | set(config.get("target_parameters") or [])
    if names != set(manifest["targets"]):
        raise CheckpointError(f"{path} and {MANIFEST_NAME} name different targets")
    if config.get("r") != manifest["r"] or float(config.get("lora_alpha", math.nan)) != float(manifest["alpha"]):
        raise CheckpointError(f"{path} and {MANIFEST_NAME} give different r / alpha")


def _compare_identity(found: Any, expected: dict, path: Path) -> None:
    """Raise :class:`CheckpointError` naming every field where the adapter's base differs."""
    expected = _check_identity(expected)
    if not isinstance(found, dict):
        raise CheckpointError(f"{path}: base identity is not a mapping: {found!r}")
    absent = object()
    fields = sorted(k for k in found.keys() | expected.keys() if found.get(k, absent) != expected.get(k, absent))
    if fields:
        details = "; ".join(
            f"field {k!r}: adapter has {found.get(k, '<missing>')!r}, expected {expected.get(k, '<missing>')!r}"
            for k in fields
        )
        raise CheckpointError(f"adapter {path.parent} was trained on another base: {details}")


def load_adapter(base_model: nn.Module, adapter_dir: Path, expected_base: dict | None = None) -> "peft.PeftModel":
    """Wrap ``base_model`` with the adapter saved by :func:`save_adapter`.

    The manifest's exact targets are adapted (the same checks as :func:`~dsq.finetune.lora.apply_lora`)
    and the safetensors weights loaded; every LoRA tensor must be present and used.

    Args:
        base_model: the base the adapter was trained on (same modules, same quantization); modified
            in place.
        adapter_dir: directory written by :func:`save_adapter`.
        expected_base: if given, must equal the manifest's base identity.

    Returns:
        The ``peft.PeftModel`` in eval mode, LoRA parameters frozen; its bitsandbytes 4-bit layers on
        the dequantize path, as in :func:`~dsq.finetune.lora.apply_lora`.

    Raises:
        CheckpointError: missing/pickle files, a base identity that differs (naming the field),
            targets that do not match the model, or adapter tensors that do not fit.
    """
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    _check_safetensors_only(adapter_dir)
    manifest = read_manifest(adapter_dir)
    _check_config_agrees(adapter_dir, manifest)
    if expected_base is not None:
        _compare_identity(manifest["base"], expected_base, adapter_dir / MANIFEST_NAME)
    _refuse_peft_model(base_model)
    spec = LoraSpec(r=int(manifest["r"]), alpha=float(manifest["alpha"]), dropout=float(manifest.get("dropout", 0.0)))
    try:
        modules, params = _split_targets(base_model, list(manifest["targets"]))
        _check_adaptable(base_model, modules, f"adapter {adapter_dir}")
        peft_model = _wrap(base_model, spec, modules, params, inference_mode=True)
    except LoraTargetError as exc:
        raise CheckpointError(f"adapter {adapter_dir} does not fit this model: {exc}") from exc
    state = load_file(str(adapter_dir / ADAPTER_WEIGHTS_NAME))
    _set_adapter_state(peft_model, state, adapter_dir)
    return peft_model.eval()


def _set_adapter_state(peft_model: Any, state: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    from peft import set_peft_model_state_dict

    try:
        with _peft_conversion_disabled(peft_model.get_base_model()):
            result = set_peft_model_state_dict(peft_model, state, adapter_name=ADAPTER_NAME)
    except RuntimeError as exc:  # tensor shapes that do not fit the modules
        peft_model.unload()  # leave the caller's model as it was
        raise CheckpointError(f"adapter {adapter_dir} does not fit this model: {exc}") from exc
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        peft_model.unload()
        raise CheckpointError(
            f"adapter {adapter_dir} does not fit this model: missing LoRA tensors {missing[:5]}, "
            f"unexpected tensors {list(result.unexpected_keys)[:5]}"
        )
    for p in peft_model.parameters():
        p.requires_grad_(False)
