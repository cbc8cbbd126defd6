"""ONNX export of fp and dsq-quantized decoders with KV cache, validated in and run by ONNX Runtime.

``export_onnx`` writes the graph (``MatMulNBits`` / int8 matmuls built from dsq's own integers, every
MoE expert in the graph), checks it against PyTorch and writes a manifest; ``OrtCausalLM`` runs it.
"""
from .cpu_target import CPU_TARGETS, PORTABLE, VNNI, CpuTarget, cpu_target
from .decoder import CacheLayout, cache_layout
from .onnx_export import DequantizeLinearWeights, ExportConfig, ExportResult, MatMulNBitsWeights, export_onnx
from .runtime import OrtCausalLM, SamplingConfig
from .validate import ValidationConfig, ValidationReport

__all__ = [
    "CPU_TARGETS", "PORTABLE", "VNNI", "CpuTarget", "cpu_target",
    "CacheLayout", "DequantizeLinearWeights", "ExportConfig", "MatMulNBitsWeights", "ExportResult", "OrtCausalLM", "SamplingConfig", "ValidationConfig",
    "ValidationReport", "cache_layout", "export_onnx",
]
