"""INT4 for the mobile providers: every ``com.microsoft:MatMulNBits`` becomes DequantizeLinear -> MatMul.

NNAPI and CoreML do not know onnxruntime's contrib op MatMulNBits. The same int4 weights and per-block scales
fit standard ONNX: a blocked ``DequantizeLinear`` (opset 21, ``axis=0``, ``block_size``) of an INT4 (K, N)
initializer feeding a plain ``MatMul``. The rewrite is exact (it unpacks the int4 model's own weights), so
the two formats differ only in how onnxruntime computes (MatMulNBits' ``accuracy_level=4`` quantizes the
activations to int8 on the fly; the DQ form multiplies in fp32).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lp_lightning.export.graph import ExportError, op_types, save_model
from lp_lightning.export.int4 import remove_unused_initializers, require_int4_opset

MATMULNBITS_ZERO_POINT = 8  # symmetric MatMulNBits without a zero_points input: stored uint4, zero point 8


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def unpack_matmulnbits(packed: np.ndarray, k: int) -> np.ndarray:
    """MatMulNBits' B, uint8 (N, blocks, block_size // 2) -> int4 values (N, K) as int8 (low nibble first)."""
    flat = packed.reshape(packed.shape[0], -1)
    u = np.empty((flat.shape[0], flat.shape[1] * 2), dtype=np.int16)
    u[:, 0::2] = flat & 0x0F
    u[:, 1::2] = flat >> 4
    return (u[:, :k] - MATMULNBITS_ZERO_POINT).astype(np.int8)


def pack_int4(values: np.ndarray) -> bytes:
    """Signed int4 values -> ONNX INT4 raw data: two per byte, element 2i in the low nibble."""
    flat = values.astype(np.int8).reshape(-1).view(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _dq_matmul(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[list[onnx.NodeProto],
                                                                                 list[onnx.TensorProto]]:
    """DequantizeLinear + MatMul (and initializers) computing what MatMulNBits ``node`` computes."""
    a = _attrs(node)
    extra = [i for i in node.input[3:] if i]
    if a.get("bits", 4) != 4 or extra or node.input[1] not in inits or node.input[2] not in inits:
        raise ExportError(f"int4_qdq: MatMulNBits node {node.name!r} has bits={a.get('bits')!r} or inputs "
                          f"{list(node.input)!r}; only 4-bit, constant, symmetric B without bias/zero_points/g_idx "
                          f"can be rewritten")
    k, n, block = int(a["K"]), int(a["N"]), int(a["block_size"])
    q = unpack_matmulnbits(numpy_helper.to_array(inits[node.input[1]]), k)  # (N, K)
    scale = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, -1)  # (N, blocks)
    base = node.input[1]
    tensors = [
        helper.make_tensor(f"{base}__dq_int4", TensorProto.INT4, (k, n), pack_int4(q.T), raw=True),
        numpy_helper.from_array(np.ascontiguousarray(scale.T), f"{base}__dq_scale"),
        helper.make_tensor(f"{base}__dq_zero_point", TensorProto.INT4, (scale.shape[1], n),
                           [0] * scale.size),
    ]
    weight = f"{base}__dq_weight"
    nodes = [
        helper.make_node("DequantizeLinear", [t.name for t in tensors], [weight], name=f"{node.name}_dq",
                         axis=0, block_size=block),
        helper.make_node("MatMul", [node.input[0], weight], list(node.output), name=f"{node.name}_matmul"),
    ]
    return nodes, tensors


def matmulnbits_to_dq_matmul(model: onnx.ModelProto) -> int:
    """Rewrite every MatMulNBits of ``model`` to DequantizeLinear (int4, blocked) + MatMul, in place.

    Returns the number of rewritten nodes; the opset becomes >= 21 and unused initializers are removed.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            new_nodes, tensors = _dq_matmul(node, inits)
            nodes.extend(new_nodes)
            graph.initializer.extend(tensors)
            count += 1
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    if count:
        require_int4_opset(model)
        if not any(n.domain == "com.microsoft" for n in graph.node):
            kept = [o for o in model.opset_import if o.domain != "com.microsoft"]
            del model.opset_import[:]
            model.opset_import.extend(kept)
        remove_unused_initializers(model)
    return count


def export_int4_qdq(int4_path: str | os.PathLike[str], path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the int4 model at ``int4_path`` with its MatMulNBits as DequantizeLinear -> MatMul to ``path``.

    Raises :class:`ExportError` when the int4 model has no MatMulNBits (nothing to rewrite: its Conv weights
    already are int4 behind DequantizeLinear, so the int4 file itself is the mobile form).
    """
    model = onnx.load(str(int4_path))
    count = matmulnbits_to_dq_matmul(model)
    if not count:
        raise ExportError("int4_qdq: the int4 model has no MatMulNBits to rewrite (its Conv weights already are "
                          "int4 DequantizeLinear); export int4 instead")
    save_model(model, path)
    return {
        "method": "int4 model's MatMulNBits -> DequantizeLinear (int4, axis 0, blocked) + MatMul; same weights",
        "dq_matmul_nodes": count,
        "conv_int4_weights": sum(n.op_type == "DequantizeLinear" for n in model.graph.node) - count,
        "graph_op_types": op_types(model),
    }
