"""Evaluation harness: run every benchmark on a model and collect one report row."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from dsq.eval.data import MCItem, load_multiple_choice, load_text, tokenize_text
from dsq.eval.facts import (
    ArtifactQuantization, ExactMerge, LoraFacts, OnnxFacts, QuantizationFacts, ReloadNotRun, RequantizedMerge, TrainingFacts,
    reload_check_dict,
)
from dsq.eval.fidelity import FidelityResult, ReferenceLogprobs, compare_to_reference, reference_logprobs
from dsq.eval.memory import (
    PeakCUDA, PeakRSS, ServingMemory, dir_bytes, files_bytes, model_device, serving_memory, weight_bytes_in_memory,
)
from dsq.eval.multiple_choice import FewShot, MCResult, fewshot_prompts, multiple_choice
from dsq.eval.perplexity import PerplexityConfig, PerplexityResult, perplexity
from dsq.eval.reload import ReloadCheck
from dsq.eval.speed import CachedLM, SpeedConfig, SpeedResult, TorchCachedLM, measure_speed


@runtime_checkable
class SizedModel(Protocol):
    """A model that is not an ``nn.Module`` (an ONNX Runtime session) and reports its weight bytes."""

    def weight_bytes(self) -> int: ...


@dataclass(frozen=True)
class BenchmarkSuite:
    """The benchmark data and settings shared by every evaluated model.

    Attributes:
        text_path: Held-out text for perplexity and fidelity (``None``: skip both).
        mc_path: Multiple-choice JSONL (``None``: skip).
        perplexity: Sliding-window settings.
        mc_limit: Use only the first ``mc_limit`` items.
        fidelity_seq_len: Window length for fidelity.
        fidelity_max_tokens: Token budget for fidelity (first tokens of the held-out text).
        speed: Prefill/decode throughput settings (``None``: not measured).
        mc_num_fewshot: Solved exemplars before each multiple-choice context (0: zero-shot).
        mc_fewshot_seed: Seed of the exemplar draw (item ``i``: ``random.Random(f"{seed}-{i}")``).
        mc_fewshot_data: JSONL the exemplars are drawn from (``None``: the whole ``mc_path``
            file, ``mc_limit`` not applied, the item itself left out).
        mc_fewshot_delimiter: Text after every exemplar.
    """

    text_path: Path | None
    mc_path: Path | None
    perplexity: PerplexityConfig
    mc_limit: int | None = None
    fidelity_seq_len: int = 128
    fidelity_max_tokens: int = 4096
    speed: SpeedConfig | None = None
    mc_num_fewshot: int = 0
    mc_fewshot_seed: int = 1234
    mc_fewshot_data: Path | None = None
    mc_fewshot_delimiter: str = "\n\n"


Quantization = QuantizationFacts | ArtifactQuantization
"""How a row's model was quantized: in this run, or as its saved artifact records it."""
Reload = ReloadCheck | ReloadNotRun
Merge = ExactMerge | RequantizedMerge

_FACTS = ("quantization", "onnx", "training", "lora", "merge", "reload_check")  # in the order of a row's extra
_ONLY_WHEN_MEASURED = ("serving_memory",)  # left out of report.json when None


@dataclass(frozen=True)
class ModelMetrics:
    """One row of the report: every measurement of one model, and what the stages did to it.

    The stage facts are set by the caller that ran the stage (``dataclasses.replace(row,
    quantization=...)``); each present one is a key of the row's ``extra`` in ``report.json``.

    Attributes:
        name: Row label, e.g. ``"original"`` or ``"int4-g128"``.
        ppl: Perplexity, or ``None`` when no text set was given.
        mc: Multiple-choice accuracy, or ``None`` when no item set was given.
        fidelity: Agreement with the original; ``None`` for the original itself.
        weight_bytes_memory: Parameter and buffer bytes in memory.
        weight_bytes_disk: Weight-file bytes of the saved artifact, if one was given.
        artifact_bytes_disk: All bytes of the saved artifact directory, if one was given.
        peak_rss_bytes: Peak process RSS during this model's evaluation.
        eval_seconds: Wall time of this model's evaluation.
        peak_rss_reset_supported: ``False`` when ``peak_rss_bytes`` is the process-lifetime
            peak because the high-water mark could not be reset.
        speed: Prefill and decode tokens/s with a KV cache, if the suite asks for it.
        peak_cuda_allocated_bytes: Peak ``torch.cuda.max_memory_allocated`` of the model's device
            during its evaluation (high-water mark reset first); ``None`` for a model not on CUDA.
        peak_cuda_reserved_bytes: Peak ``torch.cuda.max_memory_reserved`` likewise.
        serving_memory: Weights plus KV cache at batch 1 and 4k / 32k / 128k tokens (``None``: a model that is
            no torch module with a config, e.g. an ONNX Runtime session, or an architecture whose cache is not modelled).
        quantization: How the model was quantized (``extra.quantization``).
        onnx: The ONNX export this row evaluates (``extra.onnx``).
        training: What training did (``extra.training``).
        lora: The LoRA adapter the model carries (``extra.lora``).
        merge: How the adapter was merged (``extra.merge``).
        reload_check: transformers reading the saved artifact back (``extra.reload_check``;
            :class:`ReloadNotRun`: turned off, ``null``).
    """

    name: str
    ppl: PerplexityResult | None
    mc: MCResult | None
    fidelity: FidelityResult | None
    weight_bytes_memory: int
    weight_bytes_disk: int | None
    artifact_bytes_disk: int | None
    peak_rss_bytes: int | None
    eval_seconds: float
    peak_rss_reset_supported: bool = True
    speed: SpeedResult | None = None
    peak_cuda_allocated_bytes: int | None = None
    peak_cuda_reserved_bytes: int | None = None
    serving_memory: ServingMemory | None = None
    quantization: Quantization | None = None
    onnx: OnnxFacts | None = None
    training: TrainingFacts | None = None
    lora: LoraFacts | None = None
    merge: Merge | None = None
    reload_check: Reload | None = None

    def facts_dict(self) -> dict:
        """The row's ``extra``: one key per stage fact present (an artifact quantization record
        without a weight SQNR has none)."""
        out: dict[str, Any] = {}
        if self.quantization is not None and (quantization := self.quantization.to_dict()) is not None:
            out["quantization"] = quantization
        for key, facts in (("onnx", self.onnx), ("training", self.training), ("lora", self.lora), ("merge", self.merge)):
            if facts is not None:
                out[key] = facts.to_dict()
        if self.reload_check is not None:
            out["reload_check"] = reload_check_dict(self.reload_check)
        return out

    def to_dict(self) -> dict:
        """Plain-data form: the measurements (nested results become dicts, missing ones ``None``)
        and the stage facts under ``extra``, in ``report.json``'s order of keys. ``serving_memory``
        is a key only when the row has it (rows without it keep the keys of reports written before it).

        Returns:
            A JSON-serializable dict.
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in _FACTS:
                continue
            value = getattr(self, f.name)
            if value is None and f.name in _ONLY_WHEN_MEASURED:
                continue
            out[f.name] = asdict(value) if is_dataclass(value) else value
            if f.name == "eval_seconds":
                out["extra"] = self.facts_dict()
        return out


class Evaluator:
    """Runs the benchmark suite on models; data is loaded and tokenized once.

    Evaluate the original first with ``reference=True`` so that later candidates get
    fidelity metrics. Peak RSS is process-wide: it includes every model still alive, and
    the kept reference log-probs.
    """

    def __init__(
        self,
        suite: BenchmarkSuite,
        tokenizer: Any,
        *,
        progress: bool = True,
        add_bos: bool = True,
        batch_size: int = 8,
        weight_suffixes: tuple[str, ...] = (".safetensors", ".onnx", ".onnx.data"),
        reference_dtype: torch.dtype = torch.float32,
    ) -> None:
        """Load and tokenize the suite's data.

        Args:
            suite: Data paths and settings.
            tokenizer: Tokenizer shared by the original and the candidates.
            progress: Show tqdm progress bars.
            add_bos: Prepend BOS to the text stream and to multiple-choice contexts.
            batch_size: Sequences per forward pass for every benchmark.
            weight_suffixes: File endings counted as weights on disk.
            reference_dtype: Storage dtype of the original's kept log-probs.

        Raises:
            DataError: A data file is missing, empty or invalid.
        """
        self.suite = suite
        self.tokenizer = tokenizer
        self.progress = progress
        self.add_bos = add_bos
        self.batch_size = batch_size
        self.weight_suffixes = weight_suffixes
        self.reference_dtype = reference_dtype
        self.token_ids: torch.Tensor | None = self._load_tokens()  # (tokens,)
        self.mc_items: list[MCItem] | None = (
            load_multiple_choice(suite.mc_path, suite.mc_limit) if suite.mc_path is not None else None
        )
        self.mc_fewshot: FewShot | None = self._load_fewshot()
        self.reference: ReferenceLogprobs | None = None
        # Context window for multiple choice: the model's own; a model that states none (an ONNX
        # Runtime session) gets the last one seen, so its prompts are cut as its torch original's.
        self.window: int | None = None

    def _load_fewshot(self) -> FewShot | None:
        """The few-shot settings with their exemplar set; checked here, before any model runs."""
        suite = self.suite
        if self.mc_items is None or suite.mc_num_fewshot == 0:
            return None
        if suite.mc_fewshot_data is not None:
            source = suite.mc_fewshot_data
            pool: tuple[MCItem, ...] | None = tuple(load_multiple_choice(source))
        else:
            source = suite.mc_path
            pool = tuple(load_multiple_choice(source)) if suite.mc_limit is not None else None
        fewshot = FewShot(suite.mc_num_fewshot, suite.mc_fewshot_seed, suite.mc_fewshot_delimiter, pool, str(source))
        fewshot_prompts(self.mc_items, fewshot)  # raises DataError, naming the file, when exemplars are too few
        return fewshot

    def _load_tokens(self) -> torch.Tensor | None:
        """Tokenize the held-out text up to the largest budget any benchmark needs."""
        if self.suite.text_path is None:
            return None
        budget = self.suite.perplexity.max_tokens
        if budget is not None:
            budget = max(budget, self.suite.fidelity_max_tokens)
        return tokenize_text(self.tokenizer, load_text(self.suite.text_path), budget, add_bos=self.add_bos)

    def _perplexity(self, model: nn.Module) -> PerplexityResult | None:
        if self.token_ids is None:
            return None
        return perplexity(
            model, self.token_ids, self.suite.perplexity, batch_size=self.batch_size, progress=self.progress
        )

    def _multiple_choice(self, model: nn.Module) -> MCResult | None:
        if self.mc_items is None:
            return None
        return multiple_choice(
            model,
            self.tokenizer,
            self.mc_items,
            progress=self.progress,
            batch_size=self.batch_size,
            add_bos=self.add_bos,
            max_length=self._mc_window(model),
            fewshot=self.mc_fewshot,
        )

    def _mc_window(self, model: object) -> int | None:
        self.window = _window(model) or self.window
        return self.window

    def _build_reference(self, model: nn.Module) -> None:
        if self.token_ids is None:
            return
        self.reference = reference_logprobs(
            model,
            self.token_ids,
            seq_len=self.suite.fidelity_seq_len,
            max_tokens=self.suite.fidelity_max_tokens,
            dtype=self.reference_dtype,
            batch_size=self.batch_size,
            progress=self.progress,
        )

    def _fidelity(self, model: nn.Module) -> FidelityResult | None:
        if self.reference is None:
            return None
        return compare_to_reference(model, self.reference, batch_size=self.batch_size, progress=self.progress)

    def _speed(self, model) -> SpeedResult | None:
        if self.suite.speed is None:
            return None
        lm = model if isinstance(model, CachedLM) else TorchCachedLM(model)
        return measure_speed(lm, self.suite.speed, vocab_size=len(self.tokenizer))

    def evaluate(
        self,
        name: str,
        model: nn.Module,
        *,
        reference: bool = False,
        disk_path: Path | None = None,
    ) -> ModelMetrics:
        """Run perplexity, multiple choice and fidelity on one model.

        Args:
            name: Row label for the report.
            model: Causal LM (put in eval mode here): a torch module, or any object called the same
                way that reports ``weight_bytes()`` and drives its own cache (``dsq.export.OrtCausalLM``).
            reference: This is the original: keep its log-probs for later candidates
                (its own ``fidelity`` is ``None``).
            disk_path: Saved artifact (directory or file) whose size is reported.

        Returns:
            The row of metrics, without stage facts. ``fidelity`` is ``None`` for the original and
            for candidates evaluated before any original or without a text set.

        Raises:
            DataError: A benchmark cannot be run on this data.
            CheckpointError: ``disk_path`` does not exist.
        """
        weight_bytes_disk = dir_bytes(disk_path, self.weight_suffixes) if disk_path is not None else None
        artifact_bytes_disk = files_bytes(disk_path) if disk_path is not None else None
        model.eval()
        started = time.perf_counter()
        with PeakRSS() as peak, PeakCUDA(model_device(model)) as cuda:
            ppl = self._perplexity(model)
            mc = self._multiple_choice(model)
            if reference:
                self._build_reference(model)
                fidelity = None
            else:
                fidelity = self._fidelity(model)
        speed = self._speed(model)
        weight_bytes = model.weight_bytes() if isinstance(model, SizedModel) else weight_bytes_in_memory(model)
        return ModelMetrics(
            name=name,
            ppl=ppl,
            mc=mc,
            fidelity=fidelity,
            weight_bytes_memory=weight_bytes,
            weight_bytes_disk=weight_bytes_disk,
            artifact_bytes_disk=artifact_bytes_disk,
            peak_rss_bytes=peak.peak_bytes,
            eval_seconds=time.perf_counter() - started,
            peak_rss_reset_supported=peak.reset_supported,
            speed=speed,
            peak_cuda_allocated_bytes=cuda.allocated_bytes,
            peak_cuda_reserved_bytes=cuda.reserved_bytes,
            serving_memory=serving_memory(model, weight_bytes),
        )


def _window(model: object) -> int | None:
    """The model's context window (``config.max_position_embeddings``), or ``None`` when it has none."""
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return window if isinstance(window, int) and window > 0 else None
