"""Per-module weight SQNR (dB) on the bundled model, for each weight method: range, median, worst module.

    python benchmarks/weight_sqnr.py
"""
from __future__ import annotations

import statistics

import torch

from dsq.core.checkpoint import bundled_model_path
from dsq.core.loading import load_checkpoint
from dsq.quantize import AWQConfig, GPTQConfig, PerChannel, PerGroup, RTNConfig, W8A8Config, WeightScheme, quantize_
from dsq.quantize.calibration_data import load_calibration_with_summary
from dsq.quantize.sections import CalibrationSection

CONFIGS = {
    "rtn int8 per-channel": RTNConfig(WeightScheme(8, PerChannel())),
    "rtn int4 g128": RTNConfig(WeightScheme(4, PerGroup(128))),
    "gptq int4 g128": GPTQConfig(WeightScheme(4, PerGroup(128))),
    "awq int4 g128": AWQConfig(WeightScheme(4, PerGroup(128))),
    "w8a8 dynamic + SmoothQuant": W8A8Config(),
}


def main() -> None:
    torch.manual_seed(0)
    tokenizer = load_checkpoint(bundled_model_path()).tokenizer
    spec = CalibrationSection().spec()  # the bundled calibration sample, 128 x 256 tokens
    ids, _ = load_calibration_with_summary(spec, tokenizer)
    print("| method | modules | min dB | median dB | max dB | worst module | worst expert (module, index, dB) |")
    print("|---|---|---|---|---|---|---|")
    for name, config in CONFIGS.items():
        model = load_checkpoint(bundled_model_path()).model
        report = quantize_(model, config, calibration=ids, progress=False)
        records = [r for r in report.modules if r.quantized and r.sqnr_db is not None]
        values = [r.sqnr_db for r in records]
        worst = min(records, key=lambda r: r.sqnr_db)
        experts = [(r.name, e, v) for r in records if r.expert_sqnr_db for e, v in enumerate(r.expert_sqnr_db)]
        we = min(experts, key=lambda t: t[2]) if experts else None
        expert_text = f"{we[0]} #{we[1]} {we[2]:.1f}" if we else "-"
        print(f"| {name} | {len(values)} | {min(values):.1f} | {statistics.median(values):.1f} | {max(values):.1f} | "
              f"{worst.name} | {expert_text} |")


if __name__ == "__main__":
    main()
