"""dsq.quantize: schemes, primitives, quantized modules and the ``quantize_`` verb."""
from .api import ModuleRecord, QuantizationReport, RTNConfig, quantize_, quantized_modules
from .bnb import BnbFP4Config, BnbInt8Config, BnbNF4Config
from .calibrated import AWQConfig, GPTQConfig, W8A8Config
from .modules import QuantExperts, QuantLinear, QuantTensor
from .primitives import QuantizedWeight, dequantize_weight, pack_int4, quantize_rtn, sqnr_db, unpack_int4
from .scheme import PerChannel, PerGroup, WeightScheme
from .targets import TargetSpec

__all__ = [
    "AWQConfig", "BnbFP4Config", "BnbInt8Config", "BnbNF4Config", "GPTQConfig", "W8A8Config", "ModuleRecord", "QuantizationReport", "RTNConfig", "quantize_", "quantized_modules",
    "QuantExperts", "QuantLinear", "QuantTensor", "QuantizedWeight", "dequantize_weight",
    "pack_int4", "quantize_rtn", "sqnr_db", "unpack_int4", "PerChannel", "PerGroup",
    "WeightScheme", "TargetSpec",
]
