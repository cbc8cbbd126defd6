"""The recipe's sections made ready for the stages: dtypes, the quantize step, the benchmark suite, saving.

The only place a recipe section turns into a stage's typed config, besides each method's own
section (:meth:`dsq.quantize.sections.MethodSection.config`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dsq import __version__
from dsq.assets import data_file, resolve_data_path
from dsq.core.checkpoint import SourceInfo, bundled_model_path
from dsq.core.errors import RecipeError
from dsq.core.loading import LoadedModel
from dsq.eval import BenchmarkSuite, Gates, PerplexityConfig
from dsq.eval.memory import PeakRSS
from dsq.eval.speed import SpeedConfig
from dsq.quantize import QuantizationReport, method_of, quantize_
from dsq.quantize.method import mixed_refusal
from dsq.quantize.calibration_data import load_calibration_with_summary
from dsq.quantize.kv_cache import KVCacheScheme, attach_kv_cache_quantization, calibrate_kv_cache_
from dsq.quantize.sections import CalibrationSection, MethodSection
from dsq.quantize.sequential import RESIDENT, LayerLifecycle, OnDevice
from dsq.run.recipe import EvalSection, Recipe, dump_recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class QuantizeStep:
    """The recipe's ``quantize:`` section made ready: its config and calibration tokens (loaded up front,
    so bad data fails before any evaluation)."""

    section: MethodSection
    config: object
    calibration: torch.Tensor | None = None
    calibration_summary: object | None = None
    device: str | None = None  # where each decoder layer is calibrated and quantized (None: where the model is)

    @classmethod
    def from_recipe(cls, recipe: Recipe, tokenizer) -> "QuantizeStep":
        section = recipe.quantize
        config = section.config(DTYPES[recipe.dtype])
        if refusal := mixed_refusal(config):
            raise RecipeError(refusal)
        device = layer_device(section, config)
        if not method_of(config).calibrates(config):
            return cls(section, config, device=device)
        tokens, summary = load_calibration_with_summary(section.calibration_section.spec(), tokenizer)
        return cls(section, config, tokens, summary, device=device)

    @property
    def name(self) -> str:
        """The quantized model's row name (``gptq-int4-g128``)."""
        return self.section.row_name()

    def lifecycle(self, inner: LayerLifecycle = RESIDENT) -> LayerLifecycle:
        """``inner``, with each layer moved to :attr:`device` while it is quantized when one is set."""
        return OnDevice(inner, self.device) if self.device is not None else inner

    def apply(self, model, *, progress: bool) -> tuple[QuantizationReport, float, int | None]:
        """Quantize ``model`` in place; returns the report, wall seconds and peak RSS."""
        started = time.perf_counter()
        with PeakRSS() as rss:
            qreport = quantize_(model, self.config, calibration=self.calibration, progress=progress, lifecycle=self.lifecycle())
        self.record_calibration(qreport)
        return qreport, time.perf_counter() - started, rss.peak_bytes

    def record_calibration(self, qreport: QuantizationReport) -> None:
        """Put the calibration data's summary at the head of the report's calibration record."""
        if self.calibration_summary is not None:
            qreport.calibration = {"data": self.calibration_summary.to_dict(), **(qreport.calibration or {})}


@dataclass
class KVCacheStep:
    """The recipe's ``kv_cache:`` section made ready: its scheme and calibration tokens (loaded up front, so bad
    data fails before any evaluation). The tokens are the quantize step's own when it loaded enough, otherwise
    drawn from its calibration section (or the default one) with ``kv_cache.samples`` windows."""

    scheme: KVCacheScheme
    calibration: torch.Tensor  # (samples, seq_len) token ids
    batch_size: int
    source: str

    @classmethod
    def from_recipe(cls, recipe: Recipe, tokenizer, quantize: QuantizeStep) -> KVCacheStep | None:
        section = recipe.kv_cache
        if section is None:
            return None
        data = quantize.section.calibration_section or CalibrationSection()
        loaded = quantize.calibration
        if loaded is not None and (section.samples is None or section.samples <= loaded.shape[0]):
            source = quantize.calibration_summary.source if quantize.calibration_summary is not None else "quantize calibration"
            return cls(section.scheme(), loaded[: section.samples], data.batch_size, source)
        spec = data.spec() if section.samples is None else replace(data.spec(), samples=section.samples)
        tokens, summary = load_calibration_with_summary(spec, tokenizer)
        return cls(section.scheme(), tokens, data.batch_size, summary.source)

    def row_name(self, weights_row: str) -> str:
        """``rtn-int8-g128-kv-int8``: the quantize step's row name with the KV-cache scheme."""
        return f"{weights_row}-{self.scheme.row_suffix()}"

    def apply(self, model, qreport: QuantizationReport, *, progress: bool) -> None:
        """Attach KV-cache quantization to the (weight-quantized) ``model`` and calibrate it; recorded in ``qreport``."""
        attach_kv_cache_quantization(model, self.scheme)
        record = calibrate_kv_cache_(model, self.calibration, batch_size=self.batch_size, progress=progress)
        qreport.scheme = f"{qreport.scheme}; {self.scheme.describe()}"
        qreport.calibration = {**(qreport.calibration or {}), "kv_cache": {**record.to_dict(), "data": self.source}}


def layer_device(section: MethodSection, config: object) -> str | None:
    """``quantize.device`` checked: it must exist here, and the method must quantize layer by layer."""
    if section.device is None:
        return None
    if not method_of(config).moves_layers:
        raise RecipeError(f"quantize.device is not used by {section.method} (it quantizes where the model is loaded); remove it")
    device = torch.device(section.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"quantize.device: {section.device!r} but CUDA is not available on this machine")
    return section.device


def benchmark_suite(ev: EvalSection) -> BenchmarkSuite:
    """An ``eval:`` section -> the suite; missing data paths mean the bundled sets."""
    ppl = ev.perplexity
    mc = ev.multiple_choice
    text_path = resolve_data_path(ppl.data) if ppl and ppl.data else (data_file("heldout.txt") if ppl else None)
    mc_path = resolve_data_path(mc.data) if mc and mc.data else (data_file("mc.jsonl") if mc else None)
    ppl_config = PerplexityConfig(context=ppl.context, stride=ppl.stride, max_tokens=ppl.max_tokens) if ppl else PerplexityConfig()
    sp = ev.speed
    speed = SpeedConfig(batch=sp.batch, prompt_len=sp.prompt_len, new_tokens=sp.new_tokens, repeats=sp.repeats) if sp else None
    return BenchmarkSuite(
        text_path=text_path,
        mc_path=mc_path,
        perplexity=ppl_config,
        mc_limit=mc.limit if mc else None,
        mc_num_fewshot=mc.num_fewshot if mc else 0,
        mc_fewshot_seed=mc.fewshot_seed if mc else 1234,
        mc_fewshot_data=resolve_data_path(mc.fewshot_data) if mc and mc.fewshot_data else None,
        mc_fewshot_delimiter=mc.fewshot_delimiter if mc else "\n\n",
        fidelity_seq_len=ev.fidelity.seq_len,
        fidelity_max_tokens=ev.fidelity.max_tokens,
        speed=speed,
    )


def gates_of(ev: EvalSection) -> Gates:
    return Gates(**ev.gates.model_dump())


def model_path(recipe: Recipe) -> Path:
    return Path(recipe.model).expanduser() if recipe.model else bundled_model_path()


def save_artifact(root: Path, loaded: LoadedModel, recipe: Recipe, config: object) -> None:
    """The method's artifact (weights, config, tokenizer) and the resolved recipe."""
    method_of(config).save(loaded.model, loaded.tokenizer, root, dtype_name=recipe.dtype, max_shard_bytes=recipe.max_shard_mb << 20)
    (root / "recipe.yaml").write_text(dump_recipe(recipe))


def run_meta(recipe: Recipe, source: SourceInfo, notes: tuple[str, ...] | list[str]) -> dict:
    """The report's ``meta`` of a recipe's run on the checkpoint ``source``."""
    return {
        "dsq_version": __version__,
        "model": source.path,
        "model_type": source.model_type,
        "recipe": recipe.model_dump(mode="json"),
        "checkpoint_notes": list(notes),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

