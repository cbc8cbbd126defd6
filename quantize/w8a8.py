"""W8A8: int8 per-channel symmetric weights and int8 activations, integer matmul.

Three layers, as everywhere in ``dsq.quantize``:

* math: :func:`quantize_activation` (int8 values and scales of an input) and :func:`int8_matmul`
  (int8 x int8 -> int32, through ``torch._int_mm`` where it runs, else an exact fp32 simulation);
* modules: :class:`W8A8Linear` replaces ``nn.Linear``; :class:`W8A8Experts` replaces
  transformers' fused MoE experts (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]);
* orchestration: :func:`quantize_w8a8_` swaps every selected module and returns a
  :class:`~dsq.quantize.api.QuantizationReport`.

Activation schemes are types: :class:`DynamicPerToken` (one scale per token, computed at run time),
:class:`DynamicPerTensor` (one asymmetric scale and zero point per input tensor, computed at run time: the
activations ONNX Runtime's ``DynamicQuantizeMatMul`` computes) and :class:`StaticPerTensor` (one calibrated
scale per module input; per expert for experts).

A layer computes ``y = (int32 acc of q_x @ q_w^T) * x_scale * w_scale + bias`` in fp32 and returns
the input's dtype. Integers follow compressed-tensors: symmetric int8, ``q = clamp(round(x / s),
-128, 127)``, zero point 0; activation scales are ``absmax / 127`` (per token at run time, or from
calibration), weight scales ``absmax / 127`` per output channel.

Example:
    >>> report = quantize_w8a8_(model, TargetSpec(), DynamicPerToken(), progress=False)
    >>> report.scheme
    'w8a8 int8 per-channel weights, int8 dynamic per-token activations (torch._int_mm)'
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from dsq.core.errors import QuantizationError

from .api import ModuleRecord, QuantizationReport, check_finite, module_sqnr, start_report, tensor_bytes
from .modules import GatedActivation, QuantTensor, WeightDtypeView, linear_groups, route_tokens, set_module
from .primitives import QuantizedWeight, calibrated_scale, quantize_rtn
from .scheme import PerChannel, WeightScheme
from .targets import TargetSpec, select_targets

log = logging.getLogger(__name__)

WEIGHT_SCHEME = WeightScheme(bits=8, granularity=PerChannel(), symmetric=True)
QMIN, QMAX = -128, 127
# Dynamic per-token scale = absmax / 127, as vLLM's int8 kernel computes it: a token's largest
# element maps to +-127 (+- an ulp), well inside a rounding interval. (compressed-tensors' reference
# forward, which transformers runs on a reloaded artifact, divides by (qmax - qmin) / 2 = 127.5
# instead; that puts every token's largest element exactly on a .5 rounding boundary, so 1-ulp
# differences in the scale (measured: CPU vs CUDA division) flip it between -127 and -128.)
DYNAMIC_DIVISOR = 127.0
# Static (calibrated) scale = absmax / 127: the calibrated maximum maps to 127 exactly. The scale is
# stored in the artifact, so every reader uses the same value.
STATIC_DIVISOR = 127.0
_TINY = torch.finfo(torch.float32).tiny

INT_MM = "torch._int_mm"
SIMULATED = "simulated (fp32 matmul of int8 values)"


@dataclass(frozen=True)
class DynamicPerToken:
    """Activation scale per token (row) = ``absmax(row) / 127``, computed at run time."""

    def describe(self) -> str:
        return "int8 dynamic per-token activations"


@dataclass(frozen=True)
class StaticPerTensor:
    """One calibrated scale per module input: ``absmax / 127`` of the calibration activations."""

    def describe(self) -> str:
        return "int8 static per-tensor activations"


@dataclass(frozen=True)
class DynamicPerTensor:
    """One asymmetric uint8 scale and zero point per input tensor (every token of the call), computed at run time.

    ONNX ``DynamicQuantizeLinear`` semantics: the range ``[min(x, 0), max(x, 0)]`` maps onto ``[0, 255]``,
    ``scale = range / 255``, ``zero = round(-min / scale)``, ``q = clamp(round(x / scale) + zero, 0, 255)``.
    compressed-tensors writes it as int8 ``tensor`` / ``dynamic`` / asymmetric (the same integers minus 128).
    A token's result depends on the other tokens of the same call (a prompt's outliers widen everyone's step),
    which per-token scales avoid; in exchange the whole quantization is one pass that ONNX Runtime fuses into
    its int8 matmul (``DynamicQuantizeMatMul``).
    """

    def describe(self) -> str:
        return "int8 dynamic per-tensor asymmetric activations"


ActivationScheme = DynamicPerToken | DynamicPerTensor | StaticPerTensor
U8_MAX = 255
U8_MID = 128  # uint8 value - 128 = an int8 value: how uint8 activations reach an int8 x int8 matmul


def _check_act(act: object) -> None:
    if not isinstance(act, ActivationScheme):
        raise ValueError(f"activation scheme must be DynamicPerToken(), DynamicPerTensor() or StaticPerTensor(), got {act!r}")


# ----------------------------------------------------------------------------- math


def quantize_activation(
    x: torch.Tensor, act: ActivationScheme, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and fp32 scales of activations ``x`` ``[M, K]``.

    Args:
        x: activations, one token per row.
        act: the activation scheme.
        static_scale: scalar fp32 scale (``StaticPerTensor`` only).

    Returns:
        ``(q, scale)``: q int8 ``[M, K]``; scale fp32 ``[M, 1]`` (dynamic) or ``[1, 1]`` (static).
    """
    x = x.float()
    if isinstance(act, DynamicPerToken):
        scale = (x.abs().amax(dim=-1, keepdim=True) / DYNAMIC_DIVISOR).clamp_min(_TINY)  # (M, 1)
    else:
        if static_scale is None:
            raise ValueError("StaticPerTensor needs a calibrated static_scale")
        scale = static_scale.float().reshape(1, 1)
    q = torch.round(x / scale).clamp(QMIN, QMAX).to(torch.int8)
    return q, scale


def quantize_activation_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 values (as int16) ``[M, K]``, fp32 scale and zero point (scalars) of ``x`` (:class:`DynamicPerTensor`).

    The integers ONNX ``DynamicQuantizeLinear`` gives: ``scale = (max(x, 0) - min(x, 0)) / 255``, ``zero =
    clamp(round(-min(x, 0) / scale), 0, 255)``, ``q = clamp(round(x / scale) + zero, 0, 255)``, round half to even.
    An all-zero (or empty) ``x`` gets the smallest normal scale and zero point 0.
    """
    x = x.float()
    if x.numel() == 0:
        zero = x.new_zeros(())
        return torch.zeros_like(x, dtype=torch.int16), zero + _TINY, zero
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = ((hi - lo) / U8_MAX).clamp_min(_TINY)
    zero = torch.round(-lo / scale).clamp(0, U8_MAX)
    q = (torch.round(x / scale) + zero).clamp(0, U8_MAX).to(torch.int16)
    return q, scale, zero


# (min rows, K multiple, N multiple) that torch._int_mm accepts, per device type. The CPU kernel of
# torch 2.13 takes any shape (checked: M=1, K=7, N=9 are exact); CUDA (cuBLAS) needs M > 16 and
# K, N multiples of 8.
_INT_MM_SHAPES = {"cpu": (1, 1, 1), "cuda": (17, 8, 8)}
_SIM_K_CHUNK = 1024  # |partial sums| <= 1024 * 128 * 128 = 2**24: exact in fp32


def _simulated_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` int8 ``[M, K]`` @ ``b`` int8 ``[K, N]`` -> int32, exactly, with fp32 matmuls.

    Every product and every partial sum over at most 1024 columns is an integer of magnitude at most
    2**24, which fp32 represents exactly whatever the summation order; chunks add in int32.
    """
    out = None
    for k in range(0, a.shape[1], _SIM_K_CHUNK):
        part = (a[:, k : k + _SIM_K_CHUNK].float() @ b[k : k + _SIM_K_CHUNK].float()).to(torch.int32)
        out = part if out is None else out + part
    if out is None:
        out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    return out


def _padded_int_mm(a: torch.Tensor, b: torch.Tensor, device_type: str) -> torch.Tensor:
    """torch._int_mm with zero padding up to the device's shape constraints (exact), sliced back."""
    min_m, k_mult, n_mult = _INT_MM_SHAPES[device_type]
    m, k = a.shape
    n = b.shape[1]
    pad_m, pad_k, pad_n = max(0, min_m - m), (-k) % k_mult, (-n) % n_mult
    if pad_m or pad_k:
        a = torch.nn.functional.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        b = torch.nn.functional.pad(b, (0, pad_n, 0, pad_k))
    out = torch._int_mm(a, b)
    return out[:m, :n] if (pad_m or pad_n) else out


@functools.lru_cache(maxsize=None)
def _probe(device_type: str) -> str:
    if device_type not in _INT_MM_SHAPES or not hasattr(torch, "_int_mm"):
        return SIMULATED
    device = torch.device(device_type)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(QMIN, QMAX + 1, (5, 72), generator=g, dtype=torch.int8).to(device)  # needs padding on CUDA
    b = torch.randint(QMIN, QMAX + 1, (72, 12), generator=g, dtype=torch.int8).to(device)
    try:
        got = _padded_int_mm(a, b, device_type)
    except (RuntimeError, NotImplementedError) as exc:
        log.info("torch._int_mm does not run on %s (%s); int8 matmuls are simulated", device_type, exc)
        return SIMULATED
    if got.dtype != torch.int32 or not torch.equal(got, _simulated_int_mm(a, b)):
        log.warning("torch._int_mm on %s gave a wrong result in the probe; int8 matmuls are simulated", device_type)
        return SIMULATED
    return INT_MM


def int8_matmul_backend(device: torch.device | str = "cpu") -> str:
    """The int8 matmul that runs on ``device``: ``"torch._int_mm"`` or the simulated fallback.

    Probes ``torch._int_mm`` once per device type (on a shape that needs the device's padding) and
    caches the answer; it counts as working only if it matches the exact integer reference.
    """
    return _probe(torch.device(device).type)


def int8_matmul(a: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, str]:
    """``a`` int8 ``[M, K]`` times ``w`` int8 ``[N, K]`` transposed: int32 ``[M, N]``.

    Returns:
        ``(acc, backend)``: the exact int32 accumulator and which matmul computed it.
    """
    backend = int8_matmul_backend(a.device)
    if backend == INT_MM and a.shape[0] > 0:
        return _padded_int_mm(a, w.t(), a.device.type), INT_MM
    return _simulated_int_mm(a, w.t()), SIMULATED


def static_input_scale(name: str, absmax: torch.Tensor) -> torch.Tensor:
    """Calibrated scale(s) ``absmax / 127`` (fp32), refusing NaN/inf/negative statistics.

    An entry of 0 (a module or expert that saw no calibration tokens) borrows the largest absmax of
    the same tensor (the other experts of the layer); if every entry is 0 the scale is 1/127.
    """
    scale = calibrated_scale(name, absmax.reshape(-1), STATIC_DIVISOR, "input(s)")
    bad = ~torch.isfinite(scale) | (scale <= 0)
    if bad.any():
        raise QuantizationError(f"{name}: {int(bad.sum())} input scale(s) are NaN, inf or <= 0; refusing to quantize")
    return scale


def quantize_weight_int8(name: str, weight: torch.Tensor) -> QuantizedWeight:
    """int8 per-channel symmetric weight ``[..., out, in]`` with fp32 scales ``[..., out, 1]``."""
    qw = quantize_rtn(weight.detach(), WEIGHT_SCHEME)
    check_finite(name, qw)
    return qw


# ----------------------------------------------------------------------------- modules


class _MatmulCounter:
    """Counts forward matmuls per backend, so a report can say whether integers really ran."""

    def _count(self, backend: str) -> None:
        self.matmul_calls[backend] = self.matmul_calls.get(backend, 0) + 1


def _int8_linear(
    x: torch.Tensor, qt_int: torch.Tensor, w_scale: torch.Tensor, act: ActivationScheme, in_scale: torch.Tensor | None
) -> tuple[torch.Tensor, str]:
    """fp32 ``[M, N]`` = dequantized int32 product of quantized ``x`` ``[M, K]`` and ``qt_int`` ``[N, K]``."""
    if isinstance(act, DynamicPerTensor):
        return _asymmetric_linear(x, qt_int, w_scale)
    q, x_scale = quantize_activation(x, act, in_scale)
    acc, backend = int8_matmul(q, qt_int)
    return acc.float() * x_scale * w_scale.reshape(1, -1).float(), backend


def _asymmetric_linear(x: torch.Tensor, qt_int: torch.Tensor, w_scale: torch.Tensor) -> tuple[torch.Tensor, str]:
    """:class:`DynamicPerTensor` product: ``(q - zero) @ w^T`` in int32, as ``(q - 128) @ w^T + (128 - zero) * sum_k w``
    (``q - 128`` fits int8, so the int8 matmul carries it exactly), times ``scale * w_scale``."""
    q, scale, zero = quantize_activation_tensor(x)
    acc, backend = int8_matmul((q - U8_MID).to(torch.int8), qt_int)
    row_sums = qt_int.to(torch.int32).sum(dim=-1)  # (N,)
    acc = acc + (U8_MID - zero.to(torch.int32)) * row_sums
    # one product of the two scales, then the accumulator: the order ONNX Runtime's int8 kernels use, so the exported
    # graph gives these very floats (with one scale for the whole tensor, a last-bit difference moves every rounding)
    return acc.float() * (scale * w_scale.reshape(1, -1).float()), backend


class W8A8Linear(_MatmulCounter, WeightDtypeView, nn.Module):
    """int8 x int8 replacement for ``nn.Linear``.

    Buffers: ``weight_q`` (a :class:`QuantTensor`: int8 ``packed`` ``[out, in]``, fp32 ``scale``
    ``[out, 1]``), ``input_scale`` fp32 ``[1]`` (static only); ``bias`` as in the Linear.
    Accepts inputs with any leading dimensions; computes in fp32, returns the input's dtype.
    ``n_groups``: DeepSeek-V4's grouped output projection (input ``[..., G, in_g]``, group ``g`` multiplied
    by its own rows; see :func:`dsq.quantize.modules.apply_linear`), one int8 matmul per group.
    """

    def __init__(
        self, qw: QuantizedWeight, bias: torch.Tensor | None, act: ActivationScheme, input_scale: torch.Tensor | None = None,
        n_groups: int | None = None,
    ) -> None:
        super().__init__()
        _check_act(act)
        if qw.scheme != WEIGHT_SCHEME:
            raise ValueError(f"W8A8Linear needs {WEIGHT_SCHEME.describe()} weights, got {qw.scheme.describe()}")
        if isinstance(act, StaticPerTensor) and input_scale is None:
            raise ValueError("StaticPerTensor W8A8Linear needs an input_scale")
        self.out_features, self.in_features = qw.qweight.shape
        self.act = act
        self.weight_q = QuantTensor(qw, torch.float32)
        if isinstance(act, StaticPerTensor):
            self.register_buffer("input_scale", input_scale.detach().float().reshape(1).clone())
        else:
            self.input_scale = None
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.n_groups = n_groups
        self.matmul_calls: dict[str, int] = {}

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, act: ActivationScheme, input_absmax: torch.Tensor | None = None, *, name: str = "linear"
    ) -> "W8A8Linear":
        """Quantize ``linear``'s weight; a static scheme needs the calibration ``input_absmax`` (scalar).

        Raises:
            QuantizationError: static scheme without (or with a non-scalar) ``input_absmax``, or a
                non-finite scale; the message names the module ``name``.
        """
        _check_act(act)
        scale = None
        if isinstance(act, StaticPerTensor):
            if input_absmax is None:
                raise QuantizationError(f"{name}: static W8A8 needs a calibrated input absmax for this module; none was given")
            if input_absmax.numel() != 1:
                raise QuantizationError(f"{name}: static input absmax must be a scalar, got shape {tuple(input_absmax.shape)}")
            scale = static_input_scale(f"{name}.input_scale", input_absmax)
        qw = quantize_weight_int8(f"{name}.weight", linear.weight)
        return cls(qw, linear.bias, act, scale, linear_groups(linear))

    @property
    def scheme(self) -> WeightScheme:
        return WEIGHT_SCHEME

    def _matmul(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """fp32 ``[M, len(rows)]`` of ``x`` ``[M, in]`` with output rows ``rows``."""
        y, backend = _int8_linear(x, self.weight_q.packed[rows], self.weight_q.scale[rows], self.act, self.input_scale)
        self._count(backend)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_groups is not None:
            lead, per = x.shape[:-2], self.out_features // self.n_groups
            flat = x.reshape(-1, self.n_groups, self.in_features)
            y = torch.stack([self._matmul(flat[:, g], slice(g * per, (g + 1) * per)) for g in range(self.n_groups)], dim=1)
            if self.bias is not None:
                y = y + self.bias.float().view(self.n_groups, per)
            return y.to(x.dtype).reshape(*lead, self.n_groups, per)
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, self.in_features), slice(None))
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.act.describe()}")


class W8A8Experts(_MatmulCounter, nn.Module):
    """int8 x int8 fused MoE experts with the call signature of transformers' experts modules.

    ``forward(hidden_states (tokens, H), top_k_index (tokens, k), top_k_weights (tokens, k))``
    returns ``(tokens, H)``. Each expert's input (and its SwiGLU output, the input of its down
    projection) is quantized per token (dynamic) or with the expert's own calibrated scale (static:
    ``gate_up_input_scale`` [E], ``down_input_scale`` [E]).

    Buffers: ``gate_up_proj`` / ``down_proj`` are :class:`QuantTensor` s (int8 [E, 2I, H] / [E, H, I],
    fp32 scales [E, 2I, 1] / [E, H, 1]).
    """

    def __init__(
        self,
        gate_up: QuantizedWeight,
        down: QuantizedWeight,
        glu: GatedActivation,
        act: ActivationScheme,
        gate_up_input_scale: torch.Tensor | None = None,
        down_input_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        _check_act(act)
        self.num_experts = gate_up.qweight.shape[0]
        self.hidden_dim = gate_up.qweight.shape[-1]
        self.intermediate_dim = down.qweight.shape[-1]
        self.act = act
        self.gate_up_proj = QuantTensor(gate_up, torch.float32)  # (E, 2I, H)
        self.down_proj = QuantTensor(down, torch.float32)  # (E, H, I)
        self.glu = glu
        if isinstance(act, StaticPerTensor):
            if gate_up_input_scale is None or down_input_scale is None:
                raise ValueError("StaticPerTensor W8A8Experts needs gate_up_input_scale and down_input_scale")
            for what, s in (("gate_up_input_scale", gate_up_input_scale), ("down_input_scale", down_input_scale)):
                if s.numel() != self.num_experts:
                    raise ValueError(f"{what} must have one scale per expert ({self.num_experts}), got {tuple(s.shape)}")
            self.register_buffer("gate_up_input_scale", gate_up_input_scale.detach().float().reshape(-1).clone())
            self.register_buffer("down_input_scale", down_input_scale.detach().float().reshape(-1).clone())
        else:
            self.gate_up_input_scale = None
            self.down_input_scale = None
        self.matmul_calls: dict[str, int] = {}

    @classmethod
    def from_experts(
        cls,
        experts: nn.Module,
        act: ActivationScheme,
        gate_up_absmax: torch.Tensor | None = None,
        down_absmax: torch.Tensor | None = None,
        *,
        name: str = "experts",
    ) -> "W8A8Experts":
        """Quantize fused experts; a static scheme needs per-expert absmax ``[E]`` for both inputs.

        An expert whose absmax is 0 (no calibration tokens) borrows the layer's largest absmax,
        so every scale is finite and positive.
        """
        _check_act(act)
        num_experts = experts.gate_up_proj.shape[0]
        gu_scale = dn_scale = None
        if isinstance(act, StaticPerTensor):
            for what, absmax in (("gate_up_proj", gate_up_absmax), ("down_proj", down_absmax)):
                if absmax is None:
                    raise QuantizationError(f"{name}.{what}: static W8A8 needs calibrated per-expert input absmax; none was given")
                if absmax.numel() != num_experts:
                    raise QuantizationError(
                        f"{name}.{what}: static input absmax needs one value per expert ({num_experts}), got shape {tuple(absmax.shape)}"
                    )
            gu_scale = static_input_scale(f"{name}.gate_up_proj.input_scale", gate_up_absmax)
            dn_scale = static_input_scale(f"{name}.down_proj.input_scale", down_absmax)
        gate_up = quantize_weight_int8(f"{name}.gate_up_proj", experts.gate_up_proj)
        down = quantize_weight_int8(f"{name}.down_proj", experts.down_proj)
        return cls(gate_up, down, GatedActivation.of(experts), act, gu_scale, dn_scale)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        static = isinstance(self.act, StaticPerTensor)

        def expert_forward(expert: int, x: torch.Tensor) -> torch.Tensor:  # (n, H) -> (n, H) fp32
            gu_s = self.gate_up_input_scale[expert] if static else None
            h, backend = _int8_linear(x, self.gate_up_proj.packed[expert], self.gate_up_proj.scale[expert], self.act, gu_s)
            self._count(backend)
            gate, up = h.chunk(2, dim=-1)  # (n, I) each
            mid = self.glu(gate.to(x.dtype), up.to(x.dtype))  # in the model's dtype, like transformers
            dn_s = self.down_input_scale[expert] if static else None
            y, backend = _int8_linear(mid, self.down_proj.packed[expert], self.down_proj.scale[expert], self.act, dn_s)
            self._count(backend)
            return y

        return route_tokens(hidden_states, top_k_index, top_k_weights, self.num_experts, expert_forward)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, {self.act.describe()}"


def w8a8_matmul_calls(model: nn.Module) -> dict[str, int]:
    """Forward matmuls of every W8A8 module of ``model`` so far, by backend (``torch._int_mm`` / simulated)."""
    total: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, (W8A8Linear, W8A8Experts)):
            for k, v in m.matmul_calls.items():
                total[k] = total.get(k, 0) + v
    return total


# ----------------------------------------------------------------------------- orchestration


def describe_w8a8(act: ActivationScheme, backend: str) -> str:
    return f"w8a8 int8 per-channel weights, {act.describe()} ({backend})"


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def quantize_w8a8_(
    model: nn.Module,
    targets: TargetSpec,
    act: ActivationScheme,
    input_absmax: dict[str, torch.Tensor] | None = None,
    *,
    progress: bool = True,
) -> QuantizationReport:
    """Swap every selected Linear / fused experts module of ``model`` for its W8A8 version, in place.

    Args:
        model: a transformers causal LM (or any module with Linears / fused experts).
        targets: which modules (the router and, by default, lm_head are always kept).
        act: :class:`DynamicPerToken`, :class:`DynamicPerTensor` or :class:`StaticPerTensor`.
        input_absmax: static only: calibration absmax of every selected module's input.
            Linear ``name`` -> scalar; experts ``name + ".gate_up_proj"`` -> ``[E]`` and
            ``name + ".down_proj"`` -> ``[E]`` (the input of each expert's down projection).
        progress: show a progress bar.

    Returns:
        A :class:`QuantizationReport` (method ``"w8a8"``). Its ``scheme`` names the int8 matmul that
        the forward will use on the model's device: ``torch._int_mm`` or the simulated fallback.

    Raises:
        QuantizationError: a static scale is missing (the message names the module) or not finite.
    """
    _check_act(act)
    input_absmax = input_absmax or {}
    decisions = select_targets(model, targets)
    if isinstance(act, StaticPerTensor):  # fail before touching the model
        _check_static_absmax([(d.name, d.kind) for d in decisions if d.quantize], input_absmax)
    backend = int8_matmul_backend(_model_device(model))
    scheme_text = describe_w8a8(act, backend)
    report = start_report(model, decisions, method="w8a8", scheme=scheme_text)
    for d in tqdm(decisions, desc="quantize (w8a8)", disable=not progress, unit="module"):
        params = sum(p.numel() for p in d.module.parameters())
        before = tensor_bytes(d.module)
        if not d.quantize:
            report.modules.append(ModuleRecord(d.name, d.kind, False, d.reason, params, before, before))
            continue
        new, reason = _w8a8_module(d.name, d.kind, d.module, d.reason, act, input_absmax)
        new.to(_model_device(model))
        set_module(model, d.name, new)
        sqnr, expert_sqnr = module_sqnr(d.module, new)
        report.modules.append(ModuleRecord(d.name, d.kind, True, reason, params, before, tensor_bytes(new), scheme_text,
                                           sqnr, expert_sqnr))
    return report


def _check_static_absmax(selected: list[tuple[str, str]], input_absmax: dict[str, torch.Tensor]) -> None:
    """Every selected ``(name, kind)`` must have its calibrated input absmax key(s) for static W8A8."""
    for name, kind in selected:
        keys = [name] if kind == "linear" else [f"{name}.gate_up_proj", f"{name}.down_proj"]
        missing = [k for k in keys if k not in input_absmax]
        if missing:
            raise QuantizationError(
                f"{name}: static W8A8 needs calibrated input absmax; missing key(s) {', '.join(missing)}"
            )


def _w8a8_module(
    name: str, kind: str, module: nn.Module, reason: str, act: ActivationScheme, input_absmax: dict[str, torch.Tensor]
) -> tuple[nn.Module, str]:
    """The W8A8 version of ``module`` and its report reason (noting experts that saw no calibration token)."""
    if kind == "linear":
        return W8A8Linear.from_linear(module, act, input_absmax.get(name), name=name), reason
    gu, dn = input_absmax.get(f"{name}.gate_up_proj"), input_absmax.get(f"{name}.down_proj")
    new = W8A8Experts.from_experts(module, act, gu, dn, name=name)
    if gu is not None:
        empty = int((gu.reshape(-1) == 0).sum()) + int((dn.reshape(-1) == 0).sum())
        if empty:
            reason += f"; {empty} expert input(s) saw no calibration tokens (scale from the layer's largest absmax)"
    return new, reason


@torch.no_grad()
def teacher_forced_diffs(model: nn.Module, other: nn.Module, *args, **kwargs) -> dict[str, float]:
    """Module-by-module agreement of ``other`` (e.g. transformers' reload of an artifact) with ``model``.

    Runs ``model(*args, **kwargs)`` recording the inputs and outputs of its W8A8 modules, runs
    ``other`` once (readers may decompress lazily on the first forward), then feeds each recorded
    input to ``other``'s module of the same name. End-to-end logits are a poor test of an
    activation-quantized model: a 1-ulp difference upstream (integer vs fp32 accumulation order)
    flips the rounding of a downstream activation by one int8 step, so equal modules can give
    logits that differ by ~1e-3. Teacher forcing compares each module on identical inputs.

    Returns:
        name -> max |output difference| for every W8A8 module that ran.
    """
    records: dict[str, tuple[tuple, torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: records.__setitem__(n, (inp, out)))
        for n, m in model.named_modules()
        if isinstance(m, (W8A8Linear, W8A8Experts))
    ]
    try:
        model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    other(*args, **kwargs)
    theirs = dict(other.named_modules())
    return {n: float((theirs[n](*inp) - out).abs().max()) for n, (inp, out) in records.items()}


__all__ = [
    "ActivationScheme", "DynamicPerTensor", "DynamicPerToken", "StaticPerTensor", "W8A8Experts", "W8A8Linear", "int8_matmul",
    "int8_matmul_backend", "quantize_activation", "quantize_activation_tensor", "quantize_w8a8_", "teacher_forced_diffs", "w8a8_matmul_calls",
]
