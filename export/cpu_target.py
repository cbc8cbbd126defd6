"""The CPU class an ONNX export is tuned for: which int8 kernels its graph feeds, and where they are exact.

ONNX Runtime's CPU int8 GEMM (MLAS) has one fast path on x86: unsigned 8-bit activations times
signed 8-bit weights. With VNNI (``vpdpbusd``: AVX512-VNNI, AVX-VNNI) or AMX, four u8 x s8 products are
summed straight into int32, so the result is exact; on AVX2 without VNNI the same kernel multiplies
with ``vpmaddubsw``, which sums pairs of products in *saturating* 16-bit lanes (255 x 127 x 2 > 32767),
so the int32 result is not exact. The u8 x u8 kernel (both operands with a zero point) is exact on every
CPU and slower where VNNI exists. Measured on an AVX512-VNNI EPYC, [128, 512] x [512, 1408], 2 threads:
fp32 MatMul 1.00x, u8 x u8 1.2x, per-token u8 x s8 2.6x (``benchmarks/onnx_speed.py --kernels-only
--kernel-m 128 --kernel-shapes 512x1408``).

* :data:`PORTABLE` -- W8A8 layers as u8 x u8 ``MatMulInteger`` with zero points: the same int32
  accumulators as dsq's torch forward on any CPU.
* :data:`VNNI` -- W8A8 layers as per-token ``QuantizeLinear`` (u8, zero point 128; ``DynamicQuantizeLinear`` for
  per-tensor activations) and ``com.microsoft::MatMulIntegerToFloat`` with the int8 weights as they are (s8):
  exact on a CPU with
  AVX512-VNNI, AVX-VNNI or AMX-INT8, saturating elsewhere.

Weight-only layers (MatMulNBits) are the same for both targets; their compute type is the export's
``accuracy_level`` (4 = int8 compute through the same u8 x s8 kernels: faster on VNNI, not exact).

The target is chosen by the export (``ExportConfig.cpu_target``, recipe ``export.cpu_target``), never
by the machine that runs the export; the manifest records it, and :func:`missing_features` tells the
exporter when the running CPU lacks what the graph is tuned for.
"""
from __future__ import annotations

from dataclasses import dataclass

from dsq.core.cpu import cpu_flags


@dataclass(frozen=True)
class CpuTarget:
    """One CPU class an export can be tuned for.

    Attributes:
        name: the recipe / CLI value.
        signed_int8_weights: W8A8 weights stay s8 (u8 activations x s8 weights) instead of u8 + 128.
        needs: ``/proc/cpuinfo`` flags of which at least one makes the graph's int8 kernels exact and fast
            (empty: none needed).
    """

    name: str
    signed_int8_weights: bool
    needs: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"name": self.name, "needs_one_of": list(self.needs),
                "w8a8_kernel": "u8 x s8 (QuantizeLinear or DynamicQuantizeLinear + MatMulIntegerToFloat)"
                if self.signed_int8_weights
                else "u8 x u8 (MatMulInteger with zero points)"}


PORTABLE = CpuTarget("portable", signed_int8_weights=False)
VNNI = CpuTarget("vnni", signed_int8_weights=True, needs=("avx512_vnni", "avx_vnni", "amx_int8"))
CPU_TARGETS: dict[str, CpuTarget] = {t.name: t for t in (PORTABLE, VNNI)}


def cpu_target(name: str) -> CpuTarget:
    """The :class:`CpuTarget` named ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return CPU_TARGETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"cpu_target must be one of {sorted(CPU_TARGETS)}, got {name!r}") from None


def missing_features(target: CpuTarget, flags: set[str] | None = None) -> str | None:
    """Why this CPU cannot run ``target``'s graph as intended, or ``None`` when it can.

    ``flags``: the CPU's feature flags (default: this machine's ``/proc/cpuinfo``; empty where unknown).
    """
    if not target.needs:
        return None
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return f"this CPU's feature flags are unknown (no /proc/cpuinfo); the {target.name!r} graph needs one of {', '.join(target.needs)}"
    if flags.isdisjoint(target.needs):
        return (f"this CPU has none of {', '.join(target.needs)}: the {target.name!r} graph's u8 x s8 int8 kernels "
                f"saturate here (16-bit pair sums), so its W8A8 layers are not exact on this machine")
    return None
