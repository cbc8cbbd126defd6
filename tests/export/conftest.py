"""Exports shared by the export tests (each made once per session)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dsq.core.loading import load_checkpoint
from dsq.export import export_onnx
from dsq.quantize import PerGroup, RTNConfig, TargetSpec, W8A8Config, WeightScheme, quantize_
from dsq.quantize.w8a8 import DynamicPerToken
from dsq.tools.testing import fast_export_config

FAST = fast_export_config()



@pytest.fixture(scope="session")
def exported(tiny_checkpoint, tmp_path_factory):
    """``get(arch, variant, moe_op=True)`` -> (loaded model, ExportResult); made once per session.

    ``moe_op=False``: routed experts in the sparse form instead of one MoE / QMoE node per layer."""
    made = {}

    def get(arch: str, variant: str = "fp", moe_op: bool = True):
        if (arch, variant, moe_op) not in made:
            loaded = load_checkpoint(tiny_checkpoint(arch))
            if variant == "int4":
                quantize_(loaded.model, RTNConfig(WeightScheme(4, PerGroup(32), False), TargetSpec()), progress=False)
            elif variant == "w8a8":
                calib = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
                quantize_(loaded.model, W8A8Config(activations=DynamicPerToken(), targets=TargetSpec()),
                          calibration=calib, progress=False)
            out = tmp_path_factory.mktemp(f"onnx_{arch}_{variant}") / "export"
            made[arch, variant, moe_op] = (loaded, export_onnx(loaded.model, loaded.tokenizer, out, replace(FAST, moe_op=moe_op)))
        return made[arch, variant, moe_op]

    return get


