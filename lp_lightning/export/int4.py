"""INT4 export: Linear weights to MatMulNBits (block-quantized), Conv weights to int4 DequantizeLinear.

``MatMulNBitsQuantizer`` only handles MatMul and silently skips Gemm, so Gemm nodes with constant weights
are rewritten to MatMul (+ Add for the bias) first and the stale initializers are removed. Conv has no
INT4 kernel: its weight is stored as int4 per output channel and dequantized (opset 21) for an fp32 Conv.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from lp_lightning.cli import one_line
from lp_lightning.export.graph import ExportError, layer_nodes, op_types, save_model
from lp_lightning.logs import quiet_loggers

INT4_MIN, INT4_MAX = -8, 7
# block sizes MatMulNBitsQuantizer (MlasQuantizeBlockwise) accepts; 8, 48, 512, ... fail inside onnxruntime
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def remove_unused_initializers(model: onnx.ModelProto) -> int:
    """Drop initializers no node (or graph output) reads; returns how many were removed."""
    graph = model.graph
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    removed = len(graph.initializer) - len(keep)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return removed


def require_int4_opset(model: onnx.ModelProto) -> None:
    """Raise the default-domain opset to 21 (int4 and blocked DequantizeLinear), in place."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 21:
            opset.version = 21


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite Gemm(A, W const, C) with alpha=beta=1, transA=0 to MatMul(A, W') + Add(C), in place.

    Returns the number of rewritten nodes; stale initializers are removed.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        a = _attrs(node)
        if (node.op_type != "Gemm" or node.input[1] not in inits or a.get("transA", 0)
                or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        w = np.ascontiguousarray(w.T if a.get("transB", 0) else w)
        w_name = f"{node.input[1]}__matmul"
        graph.initializer.append(numpy_helper.from_array(w, w_name))
        has_bias = len(node.input) > 2 and bool(node.input[2])
        mm_out = f"{node.output[0]}__matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=f"{node.name}_matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    remove_unused_initializers(model)
    return count


def conv_weights_to_int4(model: onnx.ModelProto) -> int:
    """Store each constant Conv weight as symmetric int4 per output channel + DequantizeLinear (opset 21)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
            name = node.input[1]
            w = numpy_helper.to_array(inits[name]).astype(np.float32)
            amax = np.abs(w.reshape(len(w), -1)).max(axis=1)
            scale = np.where(amax > 0, amax / INT4_MAX, 1.0).astype(np.float32)
            q = np.clip(np.round(w / scale.reshape(-1, *([1] * (w.ndim - 1)))), INT4_MIN, INT4_MAX).astype(np.int8)
            graph.initializer.extend([
                helper.make_tensor(f"{name}__int4", TensorProto.INT4, q.shape, q.flatten().tolist()),
                numpy_helper.from_array(scale, f"{name}__scale"),
                helper.make_tensor(f"{name}__zero_point", TensorProto.INT4, scale.shape, [0] * len(scale)),
            ])
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}__int4", f"{name}__scale",
                                                               f"{name}__zero_point"],
                                          [f"{name}__dequant"], name=f"{node.name}_dequant", axis=0))
            node.input[1] = f"{name}__dequant"
            count += 1
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    if count:
        require_int4_opset(model)
        remove_unused_initializers(model)
    return count


def _pack_uint4(q: np.ndarray, block_size: int) -> np.ndarray:
    """int4 values (N, K) -> MatMulNBits' B: uint8 (N, K // block_size, block_size // 2), zero point 8."""
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    packed = u[:, 0::2] | (u[:, 1::2] << 4)  # element 2i in the low nibble, 2i+1 in the high nibble
    return np.ascontiguousarray(packed.reshape(q.shape[0], q.shape[1] // block_size, block_size // 2))


def learned_matmulnbits(model: onnx.ModelProto, weights: Mapping[str, np.ndarray], block_size: int,
                        accuracy_level: int) -> int:
    """Replace MatMul(A, W^T const) by MatMulNBits with the LEARNED per-group scales, in place.

    ``weights`` maps a MatMul weight initializer name to its learned scales (N, K // block_size); a weight
    is only replaced when it lies exactly on that int4 grid (a FakeQuantPrecision checkpoint's snapped
    weights). Returns the number of replaced nodes.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    count = 0
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64).T  # (N, K)
        scale = np.asarray(weights[node.input[1]], dtype=np.float64)
        n, k = w.shape
        if k % block_size or scale.shape != (n, k // block_size):
            continue
        s = np.repeat(scale, block_size, axis=1)
        q = np.round(w / s)
        if q.min() < INT4_MIN or q.max() > INT4_MAX or not np.allclose(q * s, w, rtol=1e-5, atol=1e-7):
            continue  # not on the learned grid: leave it to MatMulNBitsQuantizer
        name = node.input[1]
        graph.initializer.extend([
            numpy_helper.from_array(_pack_uint4(q.astype(np.int8), block_size), f"{name}__nbits"),
            numpy_helper.from_array(scale.astype(np.float32).reshape(-1), f"{name}__nbits_scale"),
        ])
        new = helper.make_node("MatMulNBits", [node.input[0], f"{name}__nbits", f"{name}__nbits_scale"],
                               list(node.output), name=f"{node.name}_nbits", domain="com.microsoft", K=k, N=n,
                               bits=4, block_size=block_size, accuracy_level=accuracy_level)
        node.CopyFrom(new)
        count += 1
    if count:
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        remove_unused_initializers(model)
    return count


def _learned_weight_scales(fp32: onnx.ModelProto, qparams: Mapping[str, Mapping[str, Any]] | None,
                           block_size: int) -> dict[str, np.ndarray]:
    """MatMul weight name (after the Gemm rewrite) -> learned int4 per-group scales of that layer."""
    out: dict[str, np.ndarray] = {}
    nodes = layer_nodes(fp32)
    for fqn, q in (qparams or {}).items():
        node = nodes.get(fqn)
        if (node is None or node.op_type not in ("Gemm", "MatMul") or q.get("bits") != 4
                or q.get("granularity") != "per_group" or q.get("group_size") != block_size):
            continue
        scale = np.asarray(q["weight_scale"], dtype=np.float64)
        out[node.weight if node.op_type == "MatMul" else f"{node.weight}__matmul"] = scale
    return out


def _quantize_matmuls(model: onnx.ModelProto, block_size: int, accuracy_level: int) -> onnx.ModelProto:
    """MatMulNBitsQuantizer over the remaining MatMuls; its failures become one-line :class:`ExportError`."""
    try:
        with quiet_loggers("", "onnxruntime", "onnxruntime.quantization.matmul_nbits_quantizer",
                           level=logging.ERROR):
            quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                                             accuracy_level=accuracy_level)
            quantizer.process()
    except Exception as exc:  # onnxruntime raises RuntimeError/AssertionError/...; name the step and the cause
        cause = one_line(exc, limit=300)
        raise ExportError(f"int4 MatMulNBitsQuantizer failed (block_size={block_size!r}, accuracy_level="
                          f"{accuracy_level!r}; block_size must be one of {list(INT4_BLOCK_SIZES)}): "
                          f"{type(exc).__name__}: {cause}") from exc
    return quantizer.model.model


def export_int4(fp32: onnx.ModelProto, path: str | os.PathLike[str], block_size: int = 32,
                accuracy_level: int = 4, qparams: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Quantize ``fp32``'s weights to INT4 and write the model to ``path`` (atomically).

    ``qparams`` (from ``lp_lightning.quant.convert``): Linear layers trained with int4 per-group weights of
    ``group_size == block_size`` keep their learned scales; the other MatMuls get MatMulNBitsQuantizer's.
    Raises :class:`ExportError` when no weight was quantized: an "int4" file that is fp32 inside is
    never written.
    """
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    learned = _learned_weight_scales(fp32, qparams, block_size)
    rewritten = gemm_to_matmul(model)
    n_learned = learned_matmulnbits(model, learned, block_size, accuracy_level)
    model = _quantize_matmuls(model, block_size, accuracy_level)
    n_matmul = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    n_conv = conv_weights_to_int4(model)
    remove_unused_initializers(model)
    if n_matmul + n_conv == 0:
        raise ExportError("int4 export quantized no weight (no MatMulNBits, no int4 Conv weight); not writing it")
    save_model(model, path)
    return {
        "method": f"MatMulNBits block {block_size} accuracy_level {accuracy_level}; Conv int4 per-channel",
        "calibration": "learned" if learned and n_learned == len(learned) else "mixed" if n_learned else "minmax",
        "learned_matmulnbits": n_learned,
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "gemm_rewritten": rewritten,
        "matmulnbits_nodes": n_matmul,
        "conv_int4_weights": n_conv,
        "graph_op_types": op_types(model),
    }
