"""Run an exported decoder in ONNX Runtime: forward, KV-cached steps, greedy and sampled generation.

:class:`OrtCausalLM` is called like a transformers causal LM (``model(input_ids=...,
attention_mask=...).logits``), so dsq's evaluation measures it exactly as it measures a torch model,
and it implements the cached-decoding interface of :mod:`dsq.eval.speed` (``prefill`` / ``decode``).

Example:
    >>> lm = OrtCausalLM("runs/int4/onnx")
    >>> out = lm.generate(torch.tensor([[0, 17, 42]]), max_new_tokens=32)
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from dsq.core.errors import CheckpointError

from .cpu_target import CPU_TARGETS, missing_features
from .decoder import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, CacheLayout, past_names

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
EXPORT_MANIFEST = "export_manifest.json"
OPSET_RUNTIME = {21: (1, 20), 23: (1, 23)}  # the first ONNX Runtime release that runs each opset's ops on CPU


def ort_module():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise CheckpointError("onnxruntime is not installed: pip install onnxruntime") from exc
    return onnxruntime


def runtime_refusal(opset: int, version: str) -> str | None:
    """Why ONNX Runtime ``version`` cannot run a graph of ``opset`` (None when it can)."""
    needed = OPSET_RUNTIME[opset]
    try:
        have = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None  # a development build: let the session say
    if have >= needed:
        return None
    why = f"opset {opset} needs onnxruntime >= {needed[0]}.{needed[1]}; the installed onnxruntime is {version}. Upgrade it"
    runnable = [o for o, first in OPSET_RUNTIME.items() if have >= first]
    if runnable:
        why += f", or use a graph exported with opset {max(runnable)} (export.opset: {max(runnable)}, dsq export --opset {max(runnable)})"
    return why


def position_ids_from_mask(attention_mask: torch.Tensor, past: int) -> torch.Tensor:
    """Positions of the last ``seq`` tokens: running count of attended tokens minus one (0 for pads)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_min(0)[:, past:]


@dataclass(frozen=True)
class SamplingConfig:
    """Token choice in :meth:`OrtCausalLM.generate`: greedy unless ``do_sample``.

    Attributes:
        do_sample: sample from the (tempered, truncated) distribution instead of taking the argmax.
        temperature: divides the logits before sampling (> 0).
        top_k: keep the k most likely tokens (0: all).
        top_p: keep the smallest set whose probability reaches p (1.0: all).
        seed: seed of the sampling generator.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def choose_tokens(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of ``logits`` ``[batch, vocab]``."""
    if not sampling.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= sampling.top_p  # keep the token that crosses p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _cpu_target_warning(manifest: dict) -> str | None:
    """Why this CPU does not run the export's int8 kernels as its ``cpu_target`` intends, or None."""
    target = CPU_TARGETS.get((manifest.get("cpu_target") or {}).get("name", "portable"))
    return missing_features(target) if target is not None and target.needs else None


class OrtCausalLM:
    """An exported dsq decoder in an ``onnxruntime.InferenceSession``.

    Args:
        path: export directory (``model.onnx`` + external data + ``export_manifest.json``) or the
            ``.onnx`` file itself.
        threads: intra-op threads (default: ORT's choice).
        providers: execution providers (default: CPU).
        accuracy_level: compute type ORT may use when it fuses DequantizeLinear + MatMul (the
            manifest's ``accuracy_level`` wins when there is one).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, providers: list[str] | None = None,
                 accuracy_level: int = 0) -> None:
        ort = ort_module()
        path = Path(path)
        self.onnx_path = path / ONNX_FILE if path.is_dir() else path
        if not self.onnx_path.is_file():
            raise CheckpointError(f"{self.onnx_path}: no ONNX model there")
        self.manifest = _read_manifest(self.onnx_path.parent)
        refusal = runtime_refusal(self.manifest["opset"], ort.__version__) if self.manifest.get("opset") in OPSET_RUNTIME else None
        if refusal is not None:
            raise CheckpointError(f"{self.onnx_path}: {refusal}")
        self.cpu_warning = _cpu_target_warning(self.manifest)
        if self.cpu_warning:
            log.warning("%s: %s", self.onnx_path, self.cpu_warning)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # ORT fuses DequantizeLinear + MatMul (the portable weight form) into MatMulNBits with int8
        # compute (accuracy level 4) unless told otherwise: keep the export's stated level
        level = self.manifest.get("accuracy_level", accuracy_level)
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
        self.session = ort.InferenceSession(str(self.onnx_path), options, providers=providers or ["CPUExecutionProvider"])
        self.layout = self._layout_from_inputs()
        self.dtype = np.float32
        self._state: tuple[torch.Tensor, list[np.ndarray]] | None = None
        self._weight_bytes: int | None = None

    def _layout_from_inputs(self) -> CacheLayout:
        inputs = {i.name: i for i in self.session.get_inputs()}
        for required in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS):
            if required not in inputs:
                raise CheckpointError(f"{self.onnx_path}: graph input {required!r} is missing")
        layers = 0
        while past_names(layers)[0] in inputs:
            layers += 1
        if layers == 0:
            raise CheckpointError(f"{self.onnx_path}: graph has no past_key_values inputs")
        key, value = inputs[past_names(0)[0]].shape, inputs[past_names(0)[1]].shape
        return CacheLayout(layers, int(key[1]), int(key[3]), int(value[3]), mla=bool(self.manifest.get("cache", {}).get("mla")))

    # ------------------------------------------------------------------ torch-model interface
    def eval(self) -> "OrtCausalLM":
        return self

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> SimpleNamespace:
        """Full forward with an empty cache; ``.logits`` is a float32 torch tensor ``[batch, seq, vocab]``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits, _ = self.step(input_ids, attention_mask, self.empty_past(input_ids.shape[0]))
        return SimpleNamespace(logits=logits)

    def weight_bytes(self) -> int:
        """Bytes of the graph's initializers (weights, packed integers, scales), from their shapes and types."""
        if self._weight_bytes is None:
            import onnx

            graph = onnx.load(str(self.onnx_path), load_external_data=False).graph
            self._weight_bytes = sum(_tensor_bytes(t) for t in graph.initializer)
        return self._weight_bytes

    # ------------------------------------------------------------------ cached steps
    def empty_past(self, batch: int) -> list[np.ndarray]:
        lay = self.layout
        past = []
        for _ in range(lay.num_layers):
            past.append(np.zeros((batch, lay.kv_heads, 0, lay.key_dim), dtype=self.dtype))
            past.append(np.zeros((batch, lay.kv_heads, 0, lay.value_dim), dtype=self.dtype))
        return past

    def step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: list[np.ndarray],
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[np.ndarray]]:
        """One graph run: new tokens ``[batch, seq]`` over ``past``; mask covers ``past + seq``.

        Returns:
            ``(logits [batch, seq, vocab], present)``; ``present`` is the next call's ``past``.
        """
        past_len = past[0].shape[2]
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, past_len)
        feeds = {
            INPUT_IDS: input_ids.long().numpy(),
            ATTENTION_MASK: attention_mask.long().numpy(),
            POSITION_IDS: position_ids.long().numpy(),
        }
        for i in range(self.layout.num_layers):
            k, v = past_names(i)
            feeds[k], feeds[v] = past[2 * i], past[2 * i + 1]
        outputs = self.session.run(None, feeds)
        return torch.from_numpy(outputs[0]), outputs[1:]

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt with an empty cache and keep the cache; returns the last logits ``[batch, vocab]``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits, present = self.step(input_ids, attention_mask, self.empty_past(input_ids.shape[0]))
        self._state = (attention_mask, present)
        return logits[:, -1]

    def decode(self, next_ids: torch.Tensor) -> torch.Tensor:
        """One token per row ``[batch]`` over the kept cache; returns its logits ``[batch, vocab]``."""
        if self._state is None:
            raise RuntimeError("decode() before prefill()")
        mask, past = self._state
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
        logits, present = self.step(next_ids.reshape(-1, 1), mask, past)
        self._state = (mask, present)
        return logits[:, -1]

    def generate(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        sampling: SamplingConfig = SamplingConfig(),
        eos_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy (default) or sampled continuation over the KV cache.

        Args:
            input_ids: prompts ``[batch, prompt]`` (left-padded when lengths differ).
            attention_mask: 0 on padding; default all ones.
            max_new_tokens: tokens to add.
            sampling: :class:`SamplingConfig`.
            eos_token_id: a row stops (and is padded with it) after producing it.

        Returns:
            ``[batch, prompt + new]`` token ids.
        """
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.do_sample else None
        logits = self.prefill(input_ids, attention_mask)
        tokens = [input_ids]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for i in range(max_new_tokens):
            nxt = choose_tokens(logits, sampling, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            tokens.append(nxt[:, None])
            if i + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits = self.decode(nxt)
        return torch.cat(tokens, dim=1)


def _tensor_bytes(tensor) -> int:
    """Bytes of an ONNX initializer from its dims and element type (4-bit types count half a byte)."""
    import onnx

    numel = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return numel * np.dtype(dtype).itemsize


def _read_manifest(directory: Path) -> dict:
    path = directory / EXPORT_MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc

