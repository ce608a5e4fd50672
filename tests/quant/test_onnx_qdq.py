"""A fake-quant int8 model exports with torch's ops: QuantizeLinear/DequantizeLinear pairs that onnxruntime runs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from lp_lightning.quant import QuantSpec, quantize_modules


def test_int8_fake_quant_model_exports_to_qdq(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    quantize_modules(model, QuantSpec(8, "per_channel", None, 8))
    model.train()(torch.randn(64, 16))
    model.eval()
    x = torch.randn(2, 16)
    path = tmp_path / "fq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), external_data=False)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 4  # input and weight of each layer
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-5)
