"""bitsandbytes methods (``quantize.method: bnb-nf4 | bnb-fp4 | bnb-int8``): its Linear4bit / Linear8bitLt layers.

The layers themselves and their save format are :mod:`dsq.quantize.bnb`; this module is their edge.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from dsq.core.schema import Strict

from ..api import QuantizationReport, require_resident
from ..bnb import BnbConfig, BnbFP4Config, BnbInt8Config, BnbNF4Config, quantize_bnb_, save_bnb_model
from ..cost import EXPERT_BY_EXPERT, BnbBlocks, MethodCost, no_calibration
from ..method import Method, register
from ..sections import MethodSection
from ..sequential import LayerLifecycle

BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept


def _handler(
    model: torch.nn.Module, config: BnbConfig, calibration: torch.Tensor | None, progress: bool, lifecycle: LayerLifecycle
) -> QuantizationReport:
    require_resident(lifecycle, type(config).__name__)
    return quantize_bnb_(model, config, progress=progress)


def _save(model: torch.nn.Module, tokenizer, root, **_: object) -> None:
    """bitsandbytes' own serialization (the dtype and shard size of dsq's format do not apply)."""
    save_bnb_model(model, tokenizer, root)


class BnbSettings(Strict):
    blocksize: Literal[BNB_BLOCKSIZES] = 64  # weights per absmax block (4-bit methods)
    double_quant: bool = False
    threshold: float = Field(6.0, gt=0)  # bnb-int8 outlier threshold


class _BnbSection(MethodSection):
    bnb: BnbSettings = BnbSettings()

    def row_name(self) -> str:
        return self.method


class BnbNF4Section(_BnbSection):
    """``quantize:`` with ``method: bnb-nf4``."""

    method: Literal["bnb-nf4"] = "bnb-nf4"

    def config(self, dtype: torch.dtype = torch.float32) -> BnbNF4Config:
        return BnbNF4Config(targets=self.targets.spec(), compute_dtype=dtype, double_quant=self.bnb.double_quant, blocksize=self.bnb.blocksize)


class BnbFP4Section(_BnbSection):
    """``quantize:`` with ``method: bnb-fp4``."""

    method: Literal["bnb-fp4"] = "bnb-fp4"

    def config(self, dtype: torch.dtype = torch.float32) -> BnbFP4Config:
        return BnbFP4Config(targets=self.targets.spec(), compute_dtype=dtype, double_quant=self.bnb.double_quant, blocksize=self.bnb.blocksize)


class BnbInt8Section(_BnbSection):
    """``quantize:`` with ``method: bnb-int8``."""

    method: Literal["bnb-int8"] = "bnb-int8"

    def config(self, dtype: torch.dtype = torch.float32) -> BnbInt8Config:
        return BnbInt8Config(targets=self.targets.spec(), threshold=self.bnb.threshold)


def _bnb4_layout(config: BnbNF4Config | BnbFP4Config) -> BnbBlocks:
    return BnbBlocks(bits=4, blocksize=config.blocksize, double_quant=config.double_quant)


def _bnb8_layout(config: BnbInt8Config) -> BnbBlocks:
    return BnbBlocks(bits=8, blocksize=0, double_quant=False)


BNB4_COST = MethodCost(layout=_bnb4_layout, calibration=no_calibration, rounding=EXPERT_BY_EXPERT)


BNB8_COST = MethodCost(layout=_bnb8_layout, calibration=no_calibration, rounding=EXPERT_BY_EXPERT)


_BNB = dict(handler=_handler, save=_save, moves_layers=False)
BNB_NF4 = register(Method(name="bnb-nf4", section=BnbNF4Section, config=BnbNF4Config, lora_base=True, cost=BNB4_COST, **_BNB))
BNB_FP4 = register(Method(name="bnb-fp4", section=BnbFP4Section, config=BnbFP4Config, lora_base=True, cost=BNB4_COST, **_BNB))
BNB_INT8 = register(Method(name="bnb-int8", section=BnbInt8Section, config=BnbInt8Config, cost=BNB8_COST, **_BNB))
