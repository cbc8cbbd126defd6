"""Which architectures dsq's ONNX decoder graph can carry, and what it cannot for the others.

The graph (:mod:`dsq.export.decoder`) is a causal decoder with one key/value cache pair per layer and
attention over the whole cache. DeepSeek-V3.2 and V4 attend sparsely over caches of another kind, so they
are refused up front with the part that has no ONNX form, before any weight is quantized.
"""
from __future__ import annotations

UNSUPPORTED_ATTENTION: dict[str, str] = {
    "deepseek_v32": (
        "DeepSeek-V3.2's DSA lightning indexer (per query, a top-k selection of the tokens attended to, scored "
        "against an indexer key cache the model keeps beside the MLA cache) has no form in dsq's ONNX decoder graph, "
        "whose cache is one key/value pair per layer"
    ),
    "deepseek_v4": (
        "DeepSeek-V4's attention (sliding-window keys plus CSA/HCA compressed key/value entries built by learned "
        "compressors, the lightning indexer's top-k selection, per-head attention sinks, and hyper-connection "
        "streams between layers) has no form in dsq's ONNX decoder graph, whose cache is one key/value pair per layer"
    ),
}
"""``model_type`` -> the attention part dsq's ONNX export does not carry."""


def onnx_unsupported(model_type: str | None) -> str | None:
    """Why a model of ``model_type`` cannot be exported to ONNX by dsq (None: it can)."""
    return UNSUPPORTED_ATTENTION.get(model_type or "")
