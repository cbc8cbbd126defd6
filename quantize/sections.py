"""The recipe sections a quantization method reads, and the typed values they build.

Every method's section derives from :class:`MethodSection` (``method``, ``targets``, ``device``) and
adds what it reads: :class:`WeightsSection` (the integer scheme), :class:`CalibrationSection` and its
own settings. A section written for another method is an error naming the key (the sections are
strict), so a recipe says only what its method uses.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator

from dsq.assets import resolve_data_path
from dsq.core.schema import MAX_COUNT, MAX_SEQUENCE, MAX_WIDTH, Name, PathText, Pattern, Seed, Strict

from .calibration_data import CalibrationDataSpec
from .scheme import PerChannel, PerGroup, WeightScheme, parse_scheme_or_keep
from .targets import SchemeRule, TargetSpec

_DEVICE = re.compile(r"(cpu|cuda)(:[0-9]{1,4})?")


class WeightsSection(Strict):
    """Integer weight format."""

    bits: Literal[4, 8] = 8
    granularity: Literal["channel", "group"] = "group"
    group_size: int = Field(128, ge=2, le=MAX_WIDTH)
    symmetric: bool = True

    def scheme(self) -> WeightScheme:
        granularity = PerChannel() if self.granularity == "channel" else PerGroup(self.group_size)
        return WeightScheme(bits=self.bits, granularity=granularity, symmetric=self.symmetric)

    def row_name(self, method: str) -> str:
        """``gptq-int4-g128``, ``rtn-int8-ch-asym``: the report row of ``method`` with this scheme."""
        gran = "ch" if self.granularity == "channel" else f"g{self.group_size}"
        sym = "" if self.symmetric else "-asym"
        return f"{method}-int{self.bits}-{gran}{sym}"


class SchemeRuleSection(Strict):
    """One per-module scheme: modules matching ``pattern`` get ``scheme`` (``int4-g128``, ``int8-ch``,
    ``int4-g32-asym``, ...) or are kept (``keep``)."""

    pattern: Pattern
    scheme: str

    @field_validator("scheme")
    @classmethod
    def _scheme_parses(cls, v: str) -> str:
        parse_scheme_or_keep(v)  # ValueError names the accepted forms
        return v

    def rule(self) -> SchemeRule:
        return SchemeRule(self.pattern, parse_scheme_or_keep(self.scheme))


class TargetsSection(Strict):
    """Which modules are quantized (regular expressions searched in module names), and with which scheme."""

    include: list[Pattern] = Field(default_factory=lambda: [".*"], min_length=1)
    exclude: list[Pattern] = Field(default_factory=list)
    lm_head: bool = False
    indexer: bool = False  # DeepSeek-V3.2 / V4: also quantize the DSA lightning indexer's projections
    schemes: list[SchemeRuleSection] = Field(default_factory=list)  # first match wins; unmatched: quantize.weights

    def spec(self) -> TargetSpec:
        return TargetSpec(include=tuple(self.include), exclude=tuple(self.exclude), lm_head=self.lm_head,
                          indexer=self.indexer, schemes=tuple(rule.rule() for rule in self.schemes))


class CalibrationSection(Strict):
    """Calibration data for calibrated methods (read through ``datasets``)."""

    data: PathText | None = None  # .txt / .jsonl / .json / .parquet file or a save_to_disk dir; None: bundled sample
    dataset: Name | None = None  # hub dataset name, only when data is None and the machine is online
    split: Name = "train"
    text_field: Name = "text"
    messages_field: Name | None = None  # chat messages rendered with the tokenizer's chat template
    samples: int = Field(128, ge=1, le=MAX_COUNT)
    seq_len: int = Field(256, ge=2, le=MAX_SEQUENCE)
    seed: Seed = 0
    batch_size: int = Field(8, ge=1, le=MAX_WIDTH)

    def spec(self) -> CalibrationDataSpec:
        path: Path | None = resolve_data_path(self.data) if self.data else None
        return CalibrationDataSpec(
            path=str(path) if path is not None else None, dataset=self.dataset, split=self.split,
            text_field=self.text_field, messages_field=self.messages_field, samples=self.samples,
            seq_len=self.seq_len, seed=self.seed,
        )


class MethodSection(Strict):
    """What every method's ``quantize:`` section holds; subclasses add ``method: Literal[name]`` and their settings."""

    method: str
    targets: TargetsSection = TargetsSection()
    device: str | None = None  # e.g. "cuda": each decoder layer is moved there to be calibrated and quantized; the rest stays on CPU

    @field_validator("device")
    @classmethod
    def _device_parses(cls, v: str | None) -> str | None:
        if v is not None and _DEVICE.fullmatch(v) is None:
            raise ValueError("a device is 'cpu', 'cuda' or 'cuda:N'")
        return v

    def config(self, dtype: torch.dtype = torch.float32) -> object:
        """The method's typed config (what :func:`~dsq.quantize.quantize_` dispatches on)."""
        raise NotImplementedError(type(self).__name__)

    def row_name(self) -> str:
        """The name of the quantized model's row in the report."""
        raise NotImplementedError(type(self).__name__)

    @property
    def calibration_section(self) -> CalibrationSection | None:
        """The calibration data this section reads (None: the method reads none)."""
        return getattr(self, "calibration", None)


class WeightMethodSection(MethodSection):
    """A weight-only integer method: ``weights`` gives the scheme."""

    weights: WeightsSection = WeightsSection()

    def row_name(self) -> str:
        name = self.weights.row_name(self.method)
        return f"{name}-mixed" if self.targets.schemes else name
