"""INT8: static QDQ, per-channel int8 weights, uint8 activations, real integer kernels, learned scales."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from lp_lightning.export import ExportError, export_int8
from lp_lightning.export.evaluate import optimized_op_types
from lp_lightning.export.int8 import BatchReader, _channel_factor
from lp_lightning.export.onnx_fp32 import run_onnx
from tests.export.conftest import images


def _inits(path) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize(("net", "kernel"), [("mlp", "QGemm"), ("cnn", "QLinearConv")])
@pytest.mark.parametrize("reduce_range", [False, True])
def test_int8_x86_types_per_channel_integer_kernels(onnx_models, tmp_path, net, kernel, reduce_range):
    model, proto = onnx_models[net]
    path = tmp_path / "q.onnx"
    info = export_int8(proto, path, [images(32, s) for s in range(2)], reduce_range=reduce_range)
    assert info["calibration"] == "minmax" and info["reduce_range"] is reduce_range
    inits = _inits(path)
    weights = {k: v for k, v in inits.items() if k.endswith("weight_quantized")}
    assert weights and all(v.dtype == np.int8 for v in weights.values())
    largest = max(int(np.abs(v).max()) for v in weights.values())
    if reduce_range:
        assert largest <= 64  # 7-bit weights
    else:
        assert largest > 64  # the full int8 grid is used: a forced reduce_range would stop at 64
    scales = {k: v for k, v in inits.items() if k.endswith("weight_scale")}
    assert all(v.ndim == 1 and v.size > 1 for v in scales.values())  # per-channel
    act_zp = [v for k, v in inits.items() if k.endswith("zero_point") and "weight" not in k and "bias" not in k]
    assert act_zp and all(v.dtype == np.uint8 for v in act_zp)  # uint8 activations
    assert kernel in optimized_op_types(path)
    x = images(64, seed=9)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(run_onnx(path, x) - ref).max() < 0.25 * np.abs(ref).max()


def test_channel_factor_recovers_folded_batchnorm():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    c = np.array([0.5, -2.0, 1.0, 3.0], dtype=np.float32)
    np.testing.assert_allclose(_channel_factor(c[:, None, None, None] * w, w), c, rtol=1e-5)
    assert _channel_factor(w + 1.0, w) is None


def test_batch_reader_needs_data_and_rewinds():
    with pytest.raises(ValueError, match="at least one batch"):
        BatchReader([])
    reader = BatchReader([images(2), images(3)])
    assert [len(reader.get_next()["input"]) for _ in range(2)] == [2, 3] and reader.get_next() is None
    reader.rewind()
    assert reader.get_next() is not None


def test_int8_fails_when_nothing_quantized(onnx_models, tmp_path):
    with pytest.raises(ExportError, match="quantized nothing"):
        export_int8(onnx_models["mlp"][1], tmp_path / "q.onnx", [images(8)], op_types_to_quantize=["Softmax"])
    assert list(tmp_path.iterdir()) == []


def _qparams(model, name: str, granularity: str = "per_channel") -> dict:
    w = dict(model.named_modules())[name].weight.detach()
    scale = w.abs().amax(dim=1) / 127 if granularity == "per_channel" else w.abs().reshape(len(w), -1, 32).amax(2) / 7
    return {"weight_scale": scale, "weight_zero_point": torch.zeros(scale.shape, dtype=torch.int32),
            "bits": 8 if granularity == "per_channel" else 4, "granularity": granularity,
            "group_size": None if granularity == "per_channel" else 32,
            "act_scale": 0.05, "act_zero_point": -3, "act_bits": 8}


@pytest.mark.parametrize(("granularity", "calibration", "n_weights"), [("per_channel", "learned", 1),
                                                                       ("per_group", "mixed", 0)])
def test_learned_overrides_from_qparams(onnx_models, tmp_path, granularity, calibration, n_weights):
    model, proto = onnx_models["mlp"]
    qparams = {"net.features.1": _qparams(model, "net.features.1", granularity)}
    info = export_int8(proto, tmp_path / "q.onnx", [images(16)], model=model, qparams=qparams)
    assert info["calibration"] == calibration
    assert info["learned_activations"] == 1 and info["learned_weights"] == n_weights
    inits = _inits(tmp_path / "q.onnx")
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    first_q = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "view")
    assert float(inits[first_q.input[1]]) == pytest.approx(0.05) and int(inits[first_q.input[2]]) == 125
    if n_weights:
        np.testing.assert_allclose(inits["net.features.1.weight_scale"], qparams["net.features.1"]["weight_scale"],
                                   rtol=1e-6)


def test_learned_export_quantizes_only_layers_with_qparams(onnx_models, tmp_path):
    """With qparams, the layers without them (skipped by QAT) and every layer output stay float."""
    model, proto = onnx_models["mlp"]
    qparams = {"net.features.1": _qparams(model, "net.features.1")}
    export_int8(proto, tmp_path / "q.onnx", [images(16)], model=model, qparams=qparams)
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    weights = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear" and "weight" in n.input[0]}
    assert weights == {"net.features.1.weight_quantized"}
    inits = {i.name for i in graph.initializer}
    assert [n.input[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits] == ["view"]
    x = images(64, seed=3)
    with torch.no_grad():
        float_logits = model(torch.from_numpy(x)).numpy()
    assert np.abs(run_onnx(tmp_path / "q.onnx", x) - float_logits).max() < 0.1 * np.abs(float_logits).max()
