"""fp32 export: dynamic batch, weights inside the one file, parity check that fails loudly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from lp_lightning.export import ExportError, export_fp32, onnx_fp32
from lp_lightning.export.graph import file_size, layer_nodes
from lp_lightning.export.onnx_fp32 import run_onnx
from tests.export.conftest import cached_to_onnx, images, tiny_classifier


@pytest.mark.parametrize(("net", "kwargs"), [("mlp", {"hidden": [64, 32]}), ("cnn", {"channels": [8, 16]}),
                                             pytest.param("vit", {}, marks=pytest.mark.slow)])
def test_export_fp32_dynamic_batch_single_file_parity(net, kwargs, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_fp32, "to_onnx", cached_to_onnx)  # mlp/cnn: the trace of the shared fixture
    model = tiny_classifier(net, **kwargs)
    x = torch.from_numpy(images(16))
    path = tmp_path / "m.onnx"
    _, diff = export_fp32(model, x, path)
    assert diff < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no .onnx.data side file, no temp file
    loaded = onnx.load(str(path), load_external_data=False)
    assert all(i.data_location != onnx.TensorProto.EXTERNAL for i in loaded.graph.initializer)
    n_params = sum(p.numel() for p in model.parameters())
    assert file_size(path) >= 4 * n_params * 0.9  # the weights really are inside the file
    assert not any(len(n.metadata_props) for n in loaded.graph.node)  # stack traces stripped from the file
    for batch in (1, 3, 64):  # dynamic batch dimension
        xb = images(batch, seed=batch)
        with torch.no_grad():
            ref = model(torch.from_numpy(xb)).numpy()
        np.testing.assert_allclose(run_onnx(path, xb), ref, atol=1e-4)


def test_parity_failure_is_loud_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_fp32, "to_onnx", cached_to_onnx)
    with pytest.raises(ExportError, match="parity check failed"):
        export_fp32(tiny_classifier("mlp", hidden=[64, 32]), torch.from_numpy(images(4)), tmp_path / "m.onnx",
                    atol=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_layer_nodes_maps_module_names(onnx_models):
    model, proto = onnx_models["cnn"]
    nodes = layer_nodes(proto)
    names = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert names <= set(nodes)  # also the BatchNorm-folded convs
    assert nodes["net.classifier"].op_type == "Gemm"
    assert nodes["net.stem.0"].activation == "input"
