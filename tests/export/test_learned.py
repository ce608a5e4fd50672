"""INT8 from a FakeQuantPrecision checkpoint: the learned scales go into the ONNX graph unchanged."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lp_lightning.data import DigitsDataModule
from lp_lightning.export import ExportConfig, export_int8, run_export
from lp_lightning.export.graph import layer_nodes
from lp_lightning.export.onnx_fp32 import run_onnx, to_onnx
from lp_lightning.models import load_classifier
from lp_lightning.precision import FakeQuantPrecision
from lp_lightning.quant import convert
from tests.conftest import fit_classifier


@pytest.fixture(scope="module", params=["mlp", pytest.param("cnn", marks=pytest.mark.slow)])
def fake_quant_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    plugin = FakeQuantPrecision(weight="int8", activation="int8", granularity="per_channel",
                                freeze_observers_after=10)
    _, _, ckpt = fit_classifier(tmp_path_factory.mktemp("fq"), net=request.param, epochs=2, plugins=[plugin])
    return ckpt


def test_int8_uses_learned_scales(fake_quant_checkpoint, tmp_path):
    cfg = ExportConfig(formats=["int8"], iters=2, warmup=1, calib_batches=1)
    report = run_export(fake_quant_checkpoint, tmp_path, cfg, log=lambda s: None)
    entry = report["formats"]["int8"]
    n_layers = len(convert(load_classifier(fake_quant_checkpoint)[0])[1])
    assert entry["quantization"]["calibration"] == "learned"  # cnn: also through the BatchNorm folding
    assert entry["quantization"]["learned_layers"] == n_layers
    # the ONNX int8 model reproduces the fake-quant model it was trained as
    assert entry["agreement_fake_quant"] >= 0.98
    assert entry["max_abs_logit_diff_fake_quant"] < entry["max_abs_logit_diff"]
    assert entry["agreement"] >= 0.95 and entry["violations"] == 0 and "QGemm" in entry["op_types"]
    if report["model"] == "cnn":
        assert "QLinearConv" in entry["op_types"]

    _, qparams = convert(load_classifier(fake_quant_checkpoint)[0])
    graph = onnx.load(str(tmp_path / "model_int8.onnx")).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    consumers = {n.input[0]: n for n in graph.node if n.op_type == "QuantizeLinear"}
    for fqn, q in qparams.items():
        w_scale = inits[f"{fqn}.weight_scale"]
        if report["model"] == "mlp":  # cnn: scaled by the folded BatchNorm factor
            np.testing.assert_allclose(w_scale, q["weight_scale"].numpy(), rtol=1e-6)
        weight = inits[f"{fqn}.weight_quantized"]
        assert weight.dtype == np.int8
        assert any(n.op_type == "DequantizeLinear" and n.input[0] == f"{fqn}.weight_quantized" for n in graph.node)
    act_scales = sorted(float(inits[n.input[1]]) for n in consumers.values())
    act_zps = sorted(int(inits[n.input[2]]) for n in consumers.values())
    for q in qparams.values():  # every learned input scale/zero point is in the graph (uint8 = int8 + 128)
        assert any(abs(s - q["act_scale"]) <= 1e-7 * q["act_scale"] for s in act_scales)
        assert q["act_zero_point"] + 128 in act_zps


def test_int8_transformer_quantizes_only_what_qat_quantized(tmp_path):
    """The ViT's INT8 model computes the fake-quant function: exactly the layers' inputs are quantized, with the
    learned scales; bias, residual and position Adds, layer outputs and the logits stay float as in training
    (quantizing them flipped 3 of 270 digits predictions of a trained ViT)."""
    plugin = FakeQuantPrecision(weight="int8", activation="int8", granularity="per_channel")
    module, _, _ = fit_classifier(tmp_path, net="vit", epochs=3, plugins=[plugin],
                                  optimizer={"name": "adamw", "lr": 3e-3})
    module.eval()
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    dm.setup("test")
    x = torch.cat([b[0] for b in dm.test_dataloader()])
    calib = [b[0].numpy() for b in itertools.islice(dm.train_dataloader(), 2)]
    plain, qparams = convert(module, activations=False)
    proto = to_onnx(plain.eval(), x[:2])
    info = export_int8(proto, tmp_path / "q.onnx", calib, model=plain, qparams=qparams)
    assert info["calibration"] == "learned" and info["learned_layers"] == len(qparams) == 10

    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    inits = {i.name for i in graph.initializer}
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    nodes = layer_nodes(proto)
    assert quantized == {nodes[fqn].activation for fqn in qparams}
    with torch.no_grad():
        fake_quant = module(x).numpy()
    logits = run_onnx(tmp_path / "q.onnx", x.numpy())
    assert np.abs(logits - fake_quant).max() < 0.1  # float rounding noise only (a code off by one, rarely)
    assert (logits.argmax(1) == fake_quant.argmax(1)).mean() >= 0.995
