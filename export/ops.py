"""Torch custom ops that become ONNX Runtime's quantized operators on export.

Each op has an eager implementation (used to check the export against torch, and by
``fake``-tensor tracing through its meta kernel) and an onnxscript translation used by
``torch.onnx.export(dynamo=True, custom_translation_table=...)``:

* ``dsq::matmul_nbits`` -> ``com.microsoft::MatMulNBits`` (weight-only 4/8-bit, block-wise);
* ``dsq::matmul_int8_token`` -> per-token symmetric int8 activation quantization
  (``ReduceMax(|x|) / 127``, ``Round``, ``Clip``) + ``MatMulInteger`` (int8 values carried as uint8
  with zero point 128) -> exact int32 + rescale;
* ``dsq::matmul_int8_static`` -> the same with one calibrated activation scale;
* ``dsq::matmul_int8_token_s8`` / ``dsq::matmul_int8_static_s8`` -> the same integers for u8 x s8 kernels
  (:mod:`dsq.export.cpu_target`): ``QuantizeLinear`` (per token, or the calibrated scale; uint8, zero point
  128) + ``com.microsoft::MatMulIntegerToFloat`` with the int8 weights;
* ``dsq::matmul_int8_tensor`` -> per-tensor asymmetric uint8 activations (``DynamicQuantizeLinear``) +
  ``MatMulInteger`` (u8 x u8, weights + 128 with zero point 128) -> exact int32 + rescale;
* ``dsq::matmul_int8_tensor_s8`` -> the same ``DynamicQuantizeLinear`` + ``com.microsoft::MatMulIntegerToFloat``
  (u8 x s8, the activations' zero point as the op's ``a_zero_point``);
* ``dsq::embedding_int8`` -> ``Gather`` of int8 rows and of their scales, ``Cast``, ``Mul``.

``MatMulNBits`` layout (ONNX Runtime contrib op): ``B`` uint8 ``[N, blocks, block_size * bits / 8]``
holding unsigned values (``q + 2**(bits-1)``), 4-bit low nibble first; ``scales`` ``[N * blocks]``;
``zero_points`` uint8 packed like ``B`` along blocks, unsigned; absent means ``2**(bits-1)``.
``y = x @ ((B - zero) * scale)^T``.
"""
from __future__ import annotations

import torch

from dsq.quantize.primitives import unpack_int4
from dsq.quantize.w8a8 import DYNAMIC_DIVISOR, U8_MID, quantize_activation_tensor

_LIB = "dsq"
# int8 operands travel as uint8 with zero point 128: ORT's CPU MatMulInteger has fast u8 kernels
# (u8 x u8 is exact; u8 x s8 saturates int16 pair sums on AVX2 without VNNI, and s8 x s8 is ~5x
# slower than fp32 there). (q + 128) - 128 = q, so the int32 accumulator is the same.
W8_OFFSET = U8_MID


def unpack_nbits(b: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Unsigned values ``[N, K]`` (int16) of a MatMulNBits ``B`` ``[N, blocks, blob]``."""
    flat = b.reshape(b.shape[0], -1)
    if bits == 4:
        values = unpack_int4(flat, 2 * flat.shape[-1]).to(torch.int16) + 8
    else:
        values = flat.to(torch.int16)
    return values[:, :k]


def nbits_dequantize(
    b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, k: int, bits: int, block_size: int
) -> torch.Tensor:
    """The fp32 weight ``[N, K]`` a MatMulNBits node computes with."""
    n = b.shape[0]
    blocks = b.shape[1]
    u = unpack_nbits(b, bits, k).float()  # (N, K)
    if zero_points is None:
        zero = torch.full((n, blocks), float(1 << (bits - 1)))
    else:
        zero = unpack_nbits(zero_points.reshape(n, 1, -1), bits, blocks).float()  # (N, blocks)
    return dequantize_unsigned(u, zero, scales.reshape(n, blocks).float(), block_size)


def dequantize_unsigned(u: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, width: int) -> torch.Tensor:
    """``(u - zero) * scale`` with ``u [N, K]`` unsigned values and one ``zero`` / ``scale`` ``[N, groups]`` per
    ``width`` columns (a ragged last group is cut at K)."""
    k = u.shape[-1]
    expand = lambda t: t.repeat_interleave(width, dim=-1)[:, :k]  # noqa: E731
    return (u - expand(zero)) * expand(scale)


@torch.library.custom_op(f"{_LIB}::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    k: int,
    n: int,
    bits: int,
    block_size: int,
    accuracy_level: int,
) -> torch.Tensor:
    """``x [..., K] @ W^T`` with ``W [N, K]`` stored as MatMulNBits blocks; returns ``[..., N]``."""
    w = nbits_dequantize(b, scales, zero_points, k, bits, block_size)
    return torch.matmul(x.float(), w.t()).to(x.dtype)


@matmul_nbits.register_fake
def _(x, b, scales, zero_points, k, n, bits, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op(f"{_LIB}::embedding_int8", mutates_args=())
def embedding_int8(ids: torch.Tensor, table: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rows of an int8 table ``[V, H]`` times their scales ``[V, 1]``: ``[..., H]`` fp32."""
    return table[ids].float() * scale[ids]


@embedding_int8.register_fake
def _(ids, table, scale):
    return scale.new_empty((*ids.shape, table.shape[1]))


def _signed(w_u8: torch.Tensor) -> torch.Tensor:
    return w_u8.double() - W8_OFFSET


def _token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: ``scale = max|x| / 127`` per row (``[..., 1]``), as dsq's W8A8."""
    tiny = torch.finfo(torch.float32).tiny
    scale = (x.abs().amax(dim=-1, keepdim=True) / DYNAMIC_DIVISOR).clamp_min(tiny)
    return torch.round(x / scale).clamp(-128, 127), scale


def _token_product(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Per-token int8 ``x`` times the signed int8 weight ``w [K, N]`` (fp64 holding integers): exact int32
    accumulation, then ``* token scale * w_scale``."""
    q, scale = _token_int8(x.float())
    acc = torch.matmul(q.double(), w).float()
    return (acc * scale * w_scale).to(x.dtype)


def _static_product(x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``x`` quantized with the calibrated ``x_scale`` times the signed int8 weight ``w [K, N]`` (fp64)."""
    q = torch.round(x.float() / x_scale).clamp(-128, 127)
    acc = torch.matmul(q.double(), w).float()
    return (acc * x_scale * w_scale).to(x.dtype)


def _tensor_product(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``x`` as per-tensor asymmetric uint8 (``DynamicQuantizeLinear``) times the signed int8 weight ``w [K, N]``
    (fp64 holding integers): exact int32 of ``(q - zero) @ w``, times ``scale * w_scale``."""
    q, scale, zero = quantize_activation_tensor(x.float())
    acc = torch.matmul(q.double() - zero.double(), w).float()
    return (acc * (scale * w_scale)).to(x.dtype)  # ORT's order: the scales' product, then the accumulator


@torch.library.custom_op(f"{_LIB}::matmul_int8_tensor", mutates_args=())
def matmul_int8_tensor(x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """W8A8 with dynamic per-tensor asymmetric activations (:class:`dsq.quantize.w8a8.DynamicPerTensor`):
    ``x [..., K]``, ``w_t [K, N]`` uint8 holding int8 + 128, ``w_scale [N]``."""
    return _tensor_product(x, _signed(w_t), w_scale)


@torch.library.custom_op(f"{_LIB}::matmul_int8_tensor_s8", mutates_args=())
def matmul_int8_tensor_s8(x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The same as :func:`matmul_int8_tensor` with the int8 weights as dsq stores them (u8 x s8 kernels)."""
    return _tensor_product(x, w_t.double(), w_scale)


@torch.library.custom_op(f"{_LIB}::matmul_int8_token", mutates_args=())
def matmul_int8_token(x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """W8A8 with dynamic per-token activations: ``x [..., K]``, ``w_t`` ``[K, N]`` uint8 holding
    int8 + 128, ``w_scale [N]``."""
    return _token_product(x, _signed(w_t), w_scale)


@torch.library.custom_op(f"{_LIB}::matmul_int8_token_s8", mutates_args=())
def matmul_int8_token_s8(x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """W8A8 with dynamic per-token activations for u8 x s8 kernels (:data:`dsq.export.cpu_target.VNNI`):
    ``x [..., K]``, ``w_t`` ``[K, N]`` int8 as dsq stores it, ``w_scale [N]``. Same integers and result as
    :func:`matmul_int8_token`; only the graph's operand types differ."""
    return _token_product(x, w_t.double(), w_scale)


def _product_shape(x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Meta kernel of the dynamic int8 products: ``x [..., K]`` times ``w_t [K, N]`` -> ``[..., N]``."""
    return x.new_empty((*x.shape[:-1], w_t.shape[1]))


for _op in (matmul_int8_tensor, matmul_int8_tensor_s8, matmul_int8_token, matmul_int8_token_s8):
    _op.register_fake(_product_shape)


@torch.library.custom_op(f"{_LIB}::matmul_int8_static_s8", mutates_args=())
def matmul_int8_static_s8(x: torch.Tensor, x_scale: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """W8A8 with one calibrated activation scale, int8 weights ``w_t [K, N]`` (u8 x s8 kernels)."""
    return _static_product(x, x_scale, w_t.double(), w_scale)


@matmul_int8_static_s8.register_fake
def _(x, x_scale, w_t, w_scale):
    return x.new_empty((*x.shape[:-1], w_t.shape[1]))


@torch.library.custom_op(f"{_LIB}::matmul_int8_static", mutates_args=())
def matmul_int8_static(x: torch.Tensor, x_scale: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """W8A8 with one calibrated activation scale ``x_scale`` (scalar)."""
    return _static_product(x, x_scale, _signed(w_t), w_scale)


@matmul_int8_static.register_fake
def _(x, x_scale, w_t, w_scale):
    return x.new_empty((*x.shape[:-1], w_t.shape[1]))


def _matmul_nbits_schema():
    """The ``com.microsoft::MatMulNBits`` schema (inputs and attributes as ONNX Runtime defines them).

    The onnx package knows only the standard domain; onnxscript needs a schema to build the node.
    Registered once, on first export.
    """
    import onnx
    from onnx.defs import OpSchema

    try:
        return onnx.defs.get_schema("MatMulNBits", 1, "com.microsoft")
    except onnx.defs.SchemaError:
        pass
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attr, ints = OpSchema.Attribute, OpSchema.AttrType.INT
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[
            param("A", "T1"), param("B", "T2"), param("scales", "T1"),
            param("zero_points", "T3", param_option=optional), param("g_idx", "T4", param_option=optional),
            param("bias", "T1", param_option=optional),
        ],
        outputs=[param("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations and scales"),
            ("T2", ["tensor(uint8)", "tensor(int32)"], "packed weights"),
            ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float)", "tensor(float16)"], "zero points"),
            ("T4", ["tensor(int32)"], "group index"),
        ],
        attributes=[
            attr("K", ints), attr("N", ints), attr("bits", ints), attr("block_size", ints),
            attr("accuracy_level", ints, required=False),
        ],
    )
    onnx.defs.register_schema(schema)
    return schema


def _matmul_integer_to_float_schema():
    """The ``com.microsoft::MatMulIntegerToFloat`` schema: ``Y = (A - a_zero) (B - b_zero) * a_scale * b_scale``
    with int32 accumulation (ONNX Runtime contrib op; registered once, like :func:`_matmul_nbits_schema`)."""
    import onnx
    from onnx.defs import OpSchema

    try:
        return onnx.defs.get_schema("MatMulIntegerToFloat", 1, "com.microsoft")
    except onnx.defs.SchemaError:
        pass
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "MatMulIntegerToFloat", "com.microsoft", 1,
        inputs=[
            param("A", "T1"), param("B", "T2"), param("a_scale", "T3"), param("b_scale", "T3"),
            param("a_zero_point", "T1", param_option=optional), param("b_zero_point", "T2", param_option=optional),
            param("bias", "T3", param_option=optional),
        ],
        outputs=[param("Y", "T3")],
        type_constraints=[
            ("T1", ["tensor(int8)", "tensor(uint8)"], "activations"),
            ("T2", ["tensor(int8)", "tensor(uint8)"], "weights"),
            ("T3", ["tensor(float)", "tensor(float16)"], "scales and output"),
        ],
    )
    onnx.defs.register_schema(schema)
    return schema


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: dsq ops -> ONNX (Runtime) ops."""
    from onnx import helper as onnx_helper
    from onnxscript import opset21 as op
    from onnxscript import values

    # contrib ops have no schema in the onnx package: build the Op without one
    matmul_nbits_op = values.Op(values.Opset("com.microsoft", 1), "MatMulNBits", _matmul_nbits_schema())

    def nbits(x, b, scales, zero_points, k: int, n: int, bits: int, block_size: int, accuracy_level: int):
        inputs = [x, b, scales] + ([zero_points] if zero_points is not None else [])
        return matmul_nbits_op(
            *inputs, K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level
        )

    def int8_matmul(q, w_t):
        # (q + 128) as uint8 times (w + 128) with both zero points 128: the exact int32 of q x w; the
        # rescale happens in fp32 like dsq's torch forward
        offset = op.Constant(value=onnx_helper.make_tensor("offset", 2, [], [W8_OFFSET]))  # uint8 zero point
        q_u8 = op.Cast(op.Add(q, op.Constant(value_float=float(W8_OFFSET))), to=2)
        return op.Cast(op.MatMulInteger(q_u8, w_t, offset, offset), to=1)

    def token_scale(x):  # [..., 1]: max |x| / 127 per token, at least the smallest normal fp32
        amax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
        return op.Max(op.Div(amax, op.Constant(value_float=127.0)), op.Constant(value_float=torch.finfo(torch.float32).tiny))

    def token(x, w_t, w_scale):
        scale = token_scale(x)
        q = op.Clip(op.Round(op.Div(x, scale)), op.Constant(value_float=-128.0), op.Constant(value_float=127.0))
        return op.Mul(op.Mul(int8_matmul(q, w_t), scale), w_scale)

    def static(x, x_scale, w_t, w_scale):
        q = op.Clip(op.Round(op.Div(x, x_scale)), op.Constant(value_float=-128.0), op.Constant(value_float=127.0))
        return op.Mul(op.Mul(int8_matmul(q, w_t), x_scale), w_scale)

    int_to_float = values.Op(values.Opset("com.microsoft", 1), "MatMulIntegerToFloat", _matmul_integer_to_float_schema())
    u8_zero = lambda: op.Constant(value=onnx_helper.make_tensor("zero_point", 2, [], [W8_OFFSET]))  # noqa: E731

    def token_s8(x, w_t, w_scale):
        # u8 x s8: QuantizeLinear per token (axis 0 of the flattened [T, K] input, zero point 128, round half to
        # even and saturate to [0, 255] = dsq's clamp(round(x / s), -128, 127) + 128), then MatMulIntegerToFloat
        # with dsq's int8 weights as they are: int32 accumulation, times 1 * w_scale; the token's scale is applied
        # after the output is back in x's shape (measured faster than rescaling the flat [T, N] output first)
        scale = token_scale(x)  # [..., 1]
        flat_scale = op.Reshape(scale, op.Constant(value_ints=[-1]))  # [T]
        flat = op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), op.Shape(x, start=-1), axis=0))  # [T, K]
        zero = op.Expand(u8_zero(), op.Shape(flat_scale))  # [T] uint8 128
        q = op.QuantizeLinear(flat, flat_scale, zero, axis=0)  # [T, K] uint8
        y = int_to_float(q, w_t, op.Constant(value_float=1.0), w_scale, u8_zero())  # [T, N]
        y = op.Reshape(y, op.Concat(op.Shape(x, end=-1), op.Shape(w_scale), axis=0))  # [..., N]
        return op.Mul(y, scale)

    def static_s8(x, x_scale, w_t, w_scale):
        q = op.QuantizeLinear(x, x_scale, u8_zero())  # uint8 = clamp(round(x / s), -128, 127) + 128
        return int_to_float(q, w_t, x_scale, w_scale, u8_zero())

    def tensor(x, w_t, w_scale):
        # DynamicQuantizeLinear: uint8 q, scale and zero point of the whole tensor (dsq's quantize_activation_tensor);
        # u8 x u8 MatMulInteger with both zero points: the exact int32 of (q - zero) x w
        q, scale, zero = op.DynamicQuantizeLinear(x)
        offset = op.Constant(value=onnx_helper.make_tensor("offset", 2, [], [W8_OFFSET]))
        acc = op.Cast(op.MatMulInteger(q, w_t, zero, offset), to=1)
        return op.Mul(acc, op.Mul(scale, w_scale))

    def tensor_s8(x, w_t, w_scale):
        # the same integers for the u8 x s8 kernel; one DynamicQuantizeLinear per distinct input (the exporter merges
        # those of q/k/v and of gate/up), where a DynamicQuantizeMatMul per weight would quantize the input again
        q, scale, zero = op.DynamicQuantizeLinear(x)
        return int_to_float(q, w_t, scale, w_scale, zero)

    def embedding(ids, table, scale):
        return op.Mul(op.Cast(op.Gather(table, ids, axis=0), to=1), op.Gather(scale, ids, axis=0))

    return {
        torch.ops.dsq.embedding_int8.default: embedding,
        torch.ops.dsq.matmul_nbits.default: nbits,
        torch.ops.dsq.matmul_int8_token.default: token,
        torch.ops.dsq.matmul_int8_static.default: static,
        torch.ops.dsq.matmul_int8_token_s8.default: token_s8,
        torch.ops.dsq.matmul_int8_static_s8.default: static_s8,
        torch.ops.dsq.matmul_int8_tensor.default: tensor,
        torch.ops.dsq.matmul_int8_tensor_s8.default: tensor_s8,
    }
