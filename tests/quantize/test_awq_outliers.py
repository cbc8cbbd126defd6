"""AWQ's scale search earns its keep where large LLMs need it: activation outlier channels.

The bundled trained tiny DeepSeek-V3 gets the outlier channels of a large model
(:func:`dsq.tools.outliers.add_outlier_channels`: same fp function, 20-100x channels behind every
norm). Quantized to int4 g128 with RTN and with AWQ on the same bundled calibration text, AWQ must
follow the fp model on held-out text much more closely than RTN.

AWQ runs with ``mse_scales=False`` so that its only difference from RTN is the balance-scale
search (with ``grid=1``, i.e. only ``s = 1``, it gives RTN's exact result), and with ``grid=5``
to keep the test short.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dsq.assets import data_file, tiny_model_dir
from dsq.core.loading import load_checkpoint
from dsq.quantize import AWQConfig, PerGroup, RTNConfig, WeightScheme, quantize_
from dsq.quantize.calibration_data import CalibrationDataSpec, load_calibration
from dsq.tools.outliers import add_outlier_channels

SCHEME = WeightScheme(4, PerGroup(128))


@torch.no_grad()
def _logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)  # (batch, seq, vocab)


def _mean_kl(reference: torch.Tensor, model: nn.Module, ids: torch.Tensor) -> float:
    """Mean KL(fp || quantized) per held-out position, in nats."""
    log_q = _logprobs(model, ids).flatten(0, 1)  # (tokens, vocab)
    log_p = reference.flatten(0, 1)
    # kl_div(input=log q, target=p) = sum_v p (log p - log q) = KL(p || q)
    return float(F.kl_div(log_q, log_p.exp(), reduction="batchmean"))


def test_awq_follows_the_fp_outlier_model_far_closer_than_rtn():
    """Measured: KL(fp || RTN) 0.0200, KL(fp || AWQ) 0.0094 nats (0.47x); AWQ with ``grid=1`` 0.0200 (1.0x)."""
    loaded = load_checkpoint(tiny_model_dir())
    model = loaded.model.eval()
    add_outlier_channels(model)
    calibration = load_calibration(CalibrationDataSpec(path=str(data_file("calibration.txt")), samples=4, seq_len=64),
                                   loaded.tokenizer)  # (4, 64)
    held_out = load_calibration(CalibrationDataSpec(path=str(data_file("heldout.txt")), samples=4, seq_len=128),
                                loaded.tokenizer)  # (4, 128)
    reference = _logprobs(model, held_out)

    rtn = copy.deepcopy(model)
    quantize_(rtn, RTNConfig(SCHEME), progress=False)
    awq = copy.deepcopy(model)
    report = quantize_(awq, AWQConfig(SCHEME, grid=5, mse_scales=False, batch_size=4), calibration=calibration,
                       progress=False)

    kl_rtn, kl_awq = _mean_kl(reference, rtn, held_out), _mean_kl(reference, awq, held_out)
    assert kl_rtn > 1e-3, kl_rtn  # int4 costs something measurable
    assert kl_awq < 0.6 * kl_rtn, (kl_rtn, kl_awq)
    # the search saw the outliers at every input norm and chose a scale other than 1 there
    norms = {n: r for n, r in report.calibration["modules"].items() if n.endswith("input_layernorm")}
    assert len(norms) == model.config.num_hidden_layers
    assert all(r["input_max_over_median"] > 10 and r["awq_ratio"] > 0 for r in norms.values()), norms
