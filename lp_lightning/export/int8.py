"""INT8 export: onnxruntime static QDQ quantization, per-channel weights, x86 activation/weight types.

Scales come from min/max calibration on training batches, or, for a checkpoint trained with
FakeQuantPrecision, from the learned qparams (``lp_lightning.quant.convert``) passed to ``quantize_static``
as ``TensorQuantOverrides``. Such a model is quantized where it was trained quantized: its layers' inputs and
weights (``LEARNED_OP_TYPES``); Adds, Gemm/MatMul outputs and the layers QAT skipped stay float.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from lp_lightning.export.cpu import has_vnni
from lp_lightning.export.graph import ExportError, LayerNode, layer_nodes, op_types, save_model
from lp_lightning.export.onnx_fp32 import INPUT_NAME
from lp_lightning.logs import quiet_loggers
from lp_lightning.quant.modules import FAKE_QUANT_TYPES

# Quantize the compute-heavy ops (and the residual Add so CNN blocks stay in int8); Softmax, LayerNorm
# and elementwise Mul stay fp32, which keeps the transformer's attention accurate.
OP_TYPES = ("Conv", "Gemm", "MatMul", "Add")
# A FakeQuantPrecision model quantizes only each layer's input and weight: bias, residual and position-embedding
# Adds and the Gemm/MatMul outputs stay float (quantizing them flipped 3 of 270 ViT predictions). Conv outputs
# stay quantized (min/max calibrated): onnxruntime's integer convolution, QLinearConv, needs a quantized output.
LEARNED_OP_TYPES = ("Conv", "Gemm", "MatMul")
FLOAT_OUTPUT_OP_TYPES = ("Gemm", "MatMul")


class BatchReader(CalibrationDataReader):
    """Feeds fixed calibration batches (numpy float32, NCHW) to onnxruntime's calibrator."""

    def __init__(self, batches: Iterable[np.ndarray], input_name: str = INPUT_NAME) -> None:
        self.batches = [np.ascontiguousarray(b, dtype=np.float32) for b in batches]
        if not self.batches:
            raise ValueError("calibration needs at least one batch; got none")
        self.input_name = input_name
        self._it = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._it = iter(self.batches)


def _channel_factor(onnx_w: np.ndarray, torch_w: np.ndarray) -> np.ndarray | None:
    """Per-output-channel factor c with onnx_w == c * torch_w (1 when unchanged, BN scale when folded)."""
    if onnx_w.shape != torch_w.shape:
        return None
    o = onnx_w.reshape(len(onnx_w), -1).astype(np.float64)
    t = torch_w.reshape(len(torch_w), -1).astype(np.float64)
    c = (o * t).sum(1) / np.maximum((t * t).sum(1), 1e-30)
    ok = np.allclose(o, c[:, None] * t, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(o).max())))
    return c if ok else None


def _weight_override(node: LayerNode, onnx_w: np.ndarray, module: nn.Module, q: Mapping[str, Any]
                     ) -> list[dict[str, Any]] | None:
    """Per-channel override for a learned per-channel weight scale, or None when it does not map."""
    if q.get("granularity") != "per_channel" or not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None
    torch_w = module.weight.detach().float().numpy()
    transposed = node.op_type == "MatMul"  # MatMul stores W^T (in, out); Gemm(transB=1)/Conv store W
    factor = _channel_factor(onnx_w.T if transposed else onnx_w, torch_w)
    if factor is None:
        return None
    scale = torch.as_tensor(q["weight_scale"]).double().reshape(-1).numpy() * np.abs(factor)
    if len(scale) != len(factor) or not np.all(scale > 0):
        return None
    axis = 1 if transposed else 0
    return [{"axis": axis, "quant_type": QuantType.QInt8, "scale": np.array(s, dtype=np.float32),
             "zero_point": np.array(0, dtype=np.int8)}
            for s in scale]


Overrides = dict[str, list[dict[str, Any]]]


def learned_overrides(fp32: onnx.ModelProto, pre: onnx.ModelProto, model: nn.Module,
                      qparams: Mapping[str, Mapping[str, Any]]) -> tuple[Overrides, dict[str, int]]:
    """TensorQuantOverrides from learned qparams: input activations (uint8) and per-channel weights.

    Layers are found by weight name / the exporter's name scopes in ``fp32``; tensor names are checked in
    the pre-processed ``pre`` graph. Returns the overrides and counts: ``layers`` (every learned scale of
    the layer used), ``activations`` and ``weights`` (tensors overridden).
    """
    nodes = layer_nodes(fp32)
    inits = {i.name: i for i in pre.graph.initializer}
    tensors = {name for n in pre.graph.node for name in n.input} | inits.keys()
    modules = dict(model.named_modules())
    overrides: dict[str, list[dict[str, Any]]] = {}
    counts = {"layers": 0, "activations": 0, "weights": 0}
    for fqn, q in qparams.items():
        node, module = nodes.get(fqn), modules.get(fqn)
        if node is None or module is None:
            continue
        act_done = q.get("act_bits") != 8 or not q.get("act_scale")  # nothing learned -> nothing to use
        if not act_done and node.activation in tensors and node.activation not in inits:
            zp = int(q.get("act_zero_point") or 0) + 128  # signed [-128, 127] -> uint8 [0, 255]
            overrides[node.activation] = [{"quant_type": QuantType.QUInt8,
                                           "scale": np.array(q["act_scale"], dtype=np.float32),
                                           "zero_point": np.array(min(max(zp, 0), 255), dtype=np.uint8)}]
            counts["activations"] += 1
            act_done = True
        w = None
        if node.weight in inits:
            w = _weight_override(node, onnx.numpy_helper.to_array(inits[node.weight]), module, q)
            if w is not None:
                overrides[node.weight] = w
                counts["weights"] += 1
        counts["layers"] += act_done and w is not None
    return overrides, counts


def float_layers(fp32: onnx.ModelProto, pre: onnx.ModelProto, model: nn.Module,
                 qparams: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Names of the ``pre`` nodes computing layers QAT left float: swappable layers of ``model`` without qparams.

    A node also mapped to a learned layer (a container's name scope can name the same node) is kept.
    """
    modules = dict(model.named_modules())
    nodes = layer_nodes(fp32)
    learned = {node.weight for fqn, node in nodes.items() if fqn in qparams}
    weights = {node.weight for fqn, node in nodes.items()
               if fqn not in qparams and type(modules.get(fqn)) in FAKE_QUANT_TYPES} - learned
    return [n.name for n in pre.graph.node if n.op_type in LEARNED_OP_TYPES and n.input[1:2]
            and n.input[1] in weights]


def export_int8(fp32: onnx.ModelProto, path: str | os.PathLike[str], calibration: Iterable[np.ndarray],
                model: nn.Module | None = None, qparams: Mapping[str, Mapping[str, Any]] | None = None,
                reduce_range: bool | None = None, op_types_to_quantize: Iterable[str] | None = None
                ) -> dict[str, Any]:
    """Quantize ``fp32`` to static QDQ INT8 and write it to ``path`` (atomically).

    Args:
        fp32: the in-memory fp32 model from :func:`~lp_lightning.export.onnx_fp32.export_fp32`.
        calibration: float32 input batches from the training split.
        model, qparams: the plain PyTorch model and its learned qparams (FakeQuantPrecision); optional.
        reduce_range: 7-bit weights; None picks True on CPUs without VNNI.
        op_types_to_quantize: None: ``OP_TYPES``, or with ``qparams`` ``LEARNED_OP_TYPES`` (with float
            Gemm/MatMul outputs and the layers without qparams left float), the function QAT trained.
    Returns quantization facts for the report (calibration source, types, reduce_range, layers).
    """
    reduce_range = (not has_vnni()) if reduce_range is None else bool(reduce_range)
    reader = BatchReader(calibration)
    with tempfile.TemporaryDirectory() as tmp, quiet_loggers("", "onnxruntime", level=logging.ERROR):
        src, pre_path, out = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(fp32, str(src), save_as_external_data=False)
        quant_pre_process(str(src), str(pre_path), skip_symbolic_shape=False)
        pre = onnx.load(str(pre_path))
        overrides: Overrides = {}
        counts = {"layers": 0, "activations": 0, "weights": 0}
        extra: dict[str, Any] = {"ActivationSymmetric": False, "WeightSymmetric": True}
        inits = {i.name for i in pre.graph.initializer}
        # activation x activation MatMuls (attention scores) stay fp32: they cost accuracy and speed in int8
        exclude = [n.name for n in pre.graph.node if n.op_type == "MatMul" and n.input[1] not in inits]
        default_ops = OP_TYPES
        if qparams and model is not None:  # quantize what the fake-quant model quantized, nothing else
            overrides, counts = learned_overrides(fp32, pre, model, qparams)
            exclude += float_layers(fp32, pre, model, qparams)
            extra["OpTypesToExcludeOutputQuantization"] = list(FLOAT_OUTPUT_OP_TYPES)
            default_ops = LEARNED_OP_TYPES
        ops = default_ops if op_types_to_quantize is None else op_types_to_quantize
        if overrides:
            extra["TensorQuantOverrides"] = overrides
        try:
            quantize_static(str(pre_path), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, op_types_to_quantize=list(ops),
                            nodes_to_exclude=exclude, extra_options=extra)
        except Exception as exc:
            raise ExportError(f"int8 quantize_static failed: {type(exc).__name__}: {exc}") from exc
        quantized = onnx.load(str(out))
    n_dq = sum(n.op_type == "DequantizeLinear" for n in quantized.graph.node)
    if n_dq == 0:
        raise ExportError("int8 export quantized nothing (no DequantizeLinear in the graph); not writing it")
    save_model(quantized, path)
    n_layers = len(qparams or {})
    full = bool(n_layers) and counts["layers"] == n_layers
    return {
        # learned: every fake-quant layer's learned scales are used (other tensors min/max calibrated);
        # mixed: only some learned scales could be mapped to the graph; minmax: plain calibration.
        "calibration": "learned" if full else "mixed" if overrides else "minmax",
        "learned_layers": counts["layers"],
        "learned_activations": counts["activations"],
        "learned_weights": counts["weights"],
        "calibration_samples": sum(len(b) for b in reader.batches),
        "activation_type": "uint8",
        "weight_type": "int8",
        "per_channel": True,
        "reduce_range": reduce_range,
        "format": "QDQ",
        "graph_op_types": op_types(quantized),
    }
