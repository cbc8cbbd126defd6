"""The portable weight form: ``MatMulNBits`` nodes rewritten as standard opset-21 ops.

``com.microsoft::MatMulNBits`` runs only in ONNX Runtime. The same integers, scales and zero points
as a blocked ``DequantizeLinear`` (opset 21, ``axis=0``, ``block_size``) feeding a ``MatMul`` are
standard ONNX that any opset-21 runtime reads:

    W[k, n] = (q[k, n] - zero[k // block, n]) * scale[k // block, n]     q: uint4 / uint8 [K, N]

The rewrite is on the graph, after export: the values are unpacked from the ``MatMulNBits``
initializers bit for bit (no re-quantization) and stored as UINT4 (two per byte) or UINT8.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .ops import unpack_nbits


def _unpack_blocks(b: np.ndarray, bits: int, k: int) -> np.ndarray:
    """MatMulNBits ``B`` ``[N, blocks, blob]`` -> unsigned values ``[N, K]`` (uint8)."""
    return unpack_nbits(torch.from_numpy(np.array(b)), bits, k).numpy().astype(np.uint8)  # a writable copy


def _zero_points(node_inputs: list[str], inits: dict, n: int, blocks: int, bits: int) -> np.ndarray:
    if len(node_inputs) > 3 and node_inputs[3]:
        zp = numpy_helper.to_array(inits[node_inputs[3]]).reshape(n, -1)
        return _unpack_blocks(zp.reshape(n, 1, -1), bits, blocks)  # (N, blocks)
    return np.full((n, blocks), 1 << (bits - 1), dtype=np.uint8)


def _uint_tensor(name: str, values: np.ndarray, bits: int) -> TensorProto:
    if bits == 4:
        flat = values.astype(np.uint8).flatten()
        if flat.size % 2:
            flat = np.append(flat, np.uint8(0))
        packed = flat[0::2] | (flat[1::2] << 4)  # element 2i in the low nibble (ONNX int4 layout)
        return helper.make_tensor(name, TensorProto.UINT4, values.shape, packed.tobytes(), raw=True)
    return numpy_helper.from_array(values.astype(np.uint8), name)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def rewrite_matmul_nbits(model: onnx.ModelProto) -> int:
    """Replace every ``MatMulNBits`` of ``model`` (in place) with DequantizeLinear + MatMul.

    Returns:
        The number of nodes rewritten.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes, drop, added, count = [], set(), [], 0
    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            new_nodes.append(node)
            continue
        a = _attrs(node)
        k, n, bits, block = a["K"], a["N"], a["bits"], a["block_size"]
        b = numpy_helper.to_array(inits[node.input[1]])
        blocks = b.shape[1]
        scale = numpy_helper.to_array(inits[node.input[2]]).reshape(n, blocks)
        q = _unpack_blocks(b, bits, k)  # (N, K)
        zero = _zero_points(list(node.input), inits, n, blocks, bits)  # (N, blocks)
        base = node.name or node.output[0]
        names = (f"{base}.q", f"{base}.scale", f"{base}.zero", f"{base}.w")
        added += [
            _uint_tensor(names[0], np.ascontiguousarray(q.T), bits),  # (K, N)
            numpy_helper.from_array(np.ascontiguousarray(scale.T).astype(np.float32), names[1]),  # (blocks, N)
            _uint_tensor(names[2], np.ascontiguousarray(zero.T), bits),
        ]
        new_nodes.append(helper.make_node("DequantizeLinear", list(names[:3]), [names[3]], axis=0, block_size=block,
                                          name=f"{base}.dq"))
        out = node.output[0]
        if len(node.input) > 5 and node.input[5]:  # bias
            new_nodes.append(helper.make_node("MatMul", [node.input[0], names[3]], [out + ".nobias"], name=f"{base}.mm"))
            new_nodes.append(helper.make_node("Add", [out + ".nobias", node.input[5]], [out], name=f"{base}.bias"))
        else:
            new_nodes.append(helper.make_node("MatMul", [node.input[0], names[3]], [out], name=f"{base}.mm"))
        drop.update(i for i in list(node.input)[1:4] if i)
        count += 1
    still_used = {i for nd in new_nodes for i in nd.input}
    kept = [t for t in graph.initializer if t.name not in drop or t.name in still_used]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    if count and not any(o.domain == "com.microsoft" for nd in graph.node for o in [nd]):
        keep = [o for o in model.opset_import if o.domain != "com.microsoft"]
        del model.opset_import[:]
        model.opset_import.extend(keep)
    return count
