"""The quantization methods: one module each; importing this package registers them (in this order)."""
from . import rtn, gptq, awq, w8a8, bnb  # noqa: F401  (one line per method: the registration)
from . import autoround  # noqa: F401
