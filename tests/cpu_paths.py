"""Which CPU kernel paths this host takes, for test messages, and bitsandbytes' 4-bit repack on any host.

bitsandbytes 0.50 computes a CPU ``Linear4bit`` in one of two ways:

* the dequantize path (every CPU; the only one on AVX2-only CPUs, and whenever a layer's
  ``support_avx512bf16_for_cpu`` is False): dequantize the weight to the compute dtype, then a
  float matmul. Exactly the dequantized weight's matmul.
* the AVX512-BF16 kernel (where bitsandbytes detects AVX512-BF16): the first eval forward without
  grad repacks the weight (:func:`repack_like_the_bf16_kernel_`), then activations, absmax and the
  4-bit values are multiplied in bfloat16 with float32 sums, and the output is rounded to bfloat16.

Tests that depend on the path name it in their messages (:func:`describe`), check the dequantize path
on every host, and the kernel where the host has it.
"""
from __future__ import annotations

import torch
from torch import nn

from dsq.core.cpu import cpu_flags

BF16_UNIT_ROUNDOFF = 2.0**-8
"""Relative rounding error of one bfloat16 rounding (8 significant bits, round to nearest)."""


def bf16_kernel_detected() -> bool:
    """Whether bitsandbytes takes its AVX512-BF16 4-bit kernel here (False without bitsandbytes)."""
    try:
        from dsq.quantize.bnb import cpu_bf16_kernel_detected

        return cpu_bf16_kernel_detected()
    except ImportError:
        return False


def describe() -> str:
    """One line for assertion messages: the 4-bit path bitsandbytes takes here and why."""
    flags = cpu_flags()
    kernel = "AVX512-BF16 kernel" if bf16_kernel_detected() else "dequantize path only"
    return (
        f"bitsandbytes CPU 4-bit default: {kernel}; /proc/cpuinfo avx512_bf16: {'avx512_bf16' in flags}, "
        f"avx512_vnni: {'avx512_vnni' in flags}; torch CPU capability: {torch.backends.cpu.get_cpu_capability()}"
    )


def repack_like_the_bf16_kernel_(module: nn.Module) -> int:
    """Repack every ``Linear4bit`` of ``module`` as bitsandbytes' first AVX512-BF16 eval forward does
    (``_convert_weight_packed_for_cpu``: another nibble layout, absmax transposed to bfloat16, double
    quantization dropped), on any host and without running the kernel. Returns how many layers."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    count = 0
    for layer in module.modules():
        if isinstance(layer, bnb.nn.Linear4bit) and not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            layer.weight.data, state = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
            layer.weight.quant_state = state
            layer.quant_state = state
            count += 1
    return count
