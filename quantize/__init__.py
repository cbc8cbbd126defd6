"""dsq.quantize: schemes, primitives, quantized modules, the methods and the ``quantize_`` verb."""
from . import methods  # noqa: F401  (importing it registers every method)
from .api import ModuleRecord, QuantizationReport, quantize_, quantized_modules
from .bnb import BnbFP4Config, BnbInt8Config, BnbNF4Config
from .method import METHODS, Method, method_of
from .methods.autoround import AutoRoundConfig
from .methods.awq import AWQConfig
from .methods.gptq import GPTQConfig
from .methods.rtn import RTNConfig
from .methods.w8a8 import W8A8Config
from .modules import QuantExperts, QuantLinear, QuantTensor
from .primitives import QuantizedWeight, dequantize_weight, pack_int4, quantize_rtn, sqnr_db, unpack_int4
from .scheme import PerChannel, PerGroup, WeightScheme
from .targets import TargetSpec

__all__ = [
    "AutoRoundConfig", "AWQConfig", "BnbFP4Config", "BnbInt8Config", "BnbNF4Config", "GPTQConfig", "W8A8Config", "ModuleRecord",
    "QuantizationReport", "RTNConfig", "quantize_", "quantized_modules", "METHODS", "Method", "method_of",
    "QuantExperts", "QuantLinear", "QuantTensor", "QuantizedWeight", "dequantize_weight",
    "pack_int4", "quantize_rtn", "sqnr_db", "unpack_int4", "PerChannel", "PerGroup",
    "WeightScheme", "TargetSpec",
]
