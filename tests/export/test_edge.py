"""edge=true: NNAPI/CoreML usability (against onnxruntime's own checker), fixed-shape and ORT-format variants
re-run against PyTorch, the int4_qdq alternative, a user's and a test-only module."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from onnxruntime.tools.mobile_helpers import usability_checker as uc
from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

from lp_lightning.data import DigitsDataModule
from lp_lightning.export import ExportConfig, export_int4, export_module, run_export
from lp_lightning.export.int4_qdq import export_int4_qdq
from tests.export.conftest import images
from tests.user_pkg.data import DigitsRows
from tests.user_pkg.models import TinyResNet

FAST = {"iters": 2, "warmup": 1, "calib_batches": 1, "latency_batch_sizes": (1, 8)}
CHECKERS = {"nnapi": uc.check_nnapi_partitions,
            "coreml_mlprogram": lambda m, f: uc.check_coreml_partitions(m, f, "coreml_supported_mlprogram_ops.md")}


def _oracle(path: str, tmp: Path) -> dict[str, tuple[int, int, int, int, str]]:
    """onnxruntime's checker, called the way check_onnx_model_mobile_usability does."""
    optimize_model(Path(path), tmp / "basic.onnx", use_external_initializers=True)
    model = ModelProtoWithShapeInfo(tmp / "basic.onnx").model_with_shape_info
    out = {}
    for key, fn in CHECKERS.items():
        as_is, fixed = fn(model, True), fn(model, False)
        out[key] = (as_is.num_nodes, as_is.num_supported_nodes, as_is.num_partitions, fixed.num_supported_nodes,
                    as_is.suitability().name)
    return out


def _session(path: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _check_edge(report: dict, out: Path, x: np.ndarray, ref: np.ndarray, tmp: Path) -> None:
    """Report numbers = the checker's; variant files exist, reload, and agree with PyTorch as reported."""
    assert json.loads((out / "export_report.json").read_text()) == json.loads(json.dumps(report))
    for fmt, entry in report["edge"].items():
        oracle = _oracle(report["formats"][fmt]["path"], tmp)
        for key, (nodes, supported, partitions, fixed, verdict) in oracle.items():
            e = entry["providers"][key]
            assert (e["nodes"], e["supported_nodes"], e["partitions"], e["supported_nodes_fixed_shapes"],
                    e["verdict"]) == (nodes, supported, partitions, fixed, verdict), (fmt, key)
        for name, v in entry["variants"].items():
            assert Path(v["path"]).parent == out and Path(v["path"]).is_file(), (fmt, name)
            assert v["size_bytes"] == os.path.getsize(v["path"]) and v["n_samples"] == len(x)
            sess = _session(v["path"])
            batch = v.get("batch_size")
            if batch:  # a fixed-shape model: its input says so, and it reruns to the reported numbers
                assert [d for d in sess.get_inputs()[0].shape] == [batch, *x.shape[1:]]
                logits = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + batch]})[0]
                                         for i in range(0, len(x) - len(x) % batch, batch)])
                n = len(logits)
                assert v["agreement"] == pytest.approx(float((logits.argmax(1) == ref[:n].argmax(1)).mean()),
                                                       abs=(len(x) - n + 1) / len(x))
            else:
                assert v["path"].endswith(".ort") and Path(v["config_path"]).is_file() and v["required_operators"]
            base = report["formats"][fmt]  # the same model, another shape or file format: the same numbers
            assert abs(v["agreement"] - base["agreement"]) <= 0.02, (fmt, name)
            assert v["max_abs_logit_diff"] <= 2 * base["max_abs_logit_diff"] + 1e-4, (fmt, name)


@pytest.mark.usefixtures("fast_trace")
def test_edge_report_mlp_all_formats(digits_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = ExportConfig(formats=["fp32", "int8", "int4", "int4_qdq"], edge=True, **FAST)
    report = run_export(digits_checkpoint("mlp"), out, cfg)
    printed = capsys.readouterr().out
    assert report["passed"], report["failures"]
    assert all(f"[lp-export] edge {fmt}: NNAPI" in printed for fmt in cfg.formats)  # one summary line each
    assert "ort_format_model" not in printed and "Converting" not in printed  # the tools' chatter stays quiet
    dm = DigitsDataModule(batch_size=64)
    dm.setup("test")
    x = torch.cat([b[0] for b in dm.test_dataloader()]).float()
    from lp_lightning.models import load_checkpoint, Classifier  # noqa: I001

    with torch.no_grad():
        ref = load_checkpoint(Classifier, digits_checkpoint("mlp"))(x).numpy()
    _check_edge(report, out, x.numpy(), ref, tmp_path)
    edge = report["edge"]
    assert edge["fp32"]["providers"]["nnapi"]["supported_nodes"] == 0  # dynamic batch: nothing as is
    assert edge["fp32"]["variants"]["b1"]["providers"]["nnapi"]["supported_nodes"] == edge["fp32"]["providers"][
        "nnapi"]["nodes"]  # the fixed-shape file: everything as is
    assert edge["fp32"]["variants"]["ort"]["max_abs_logit_diff"] <= cfg.parity_atol
    blockers = {b["op"]: b for b in edge["int4"]["blockers"]}
    assert blockers["com.microsoft:MatMulNBits"]["alternative"] == "int4_qdq"
    assert set(blockers["com.microsoft:MatMulNBits"]["providers"]) == {"nnapi", "coreml_mlprogram",
                                                                       "coreml_neuralnetwork"}
    assert not any("MatMulNBits" in b["op"] for b in edge["int4_qdq"]["blockers"])
    assert edge["int4_qdq"]["providers"]["nnapi"]["supported_nodes_fixed_shapes"] == edge["int4_qdq"]["providers"][
        "nnapi"]["nodes"]
    assert edge["int4"]["variants"]["ort"]["int4_initializers_stored_as_int8"] == 0  # MatMulNBits packs uint8
    assert edge["int4_qdq"]["variants"]["ort"]["int4_initializers_stored_as_int8"] == 6  # 3 weights, 3 zero points
    names = {p.name for p in out.iterdir()}
    assert {"model_int8_b1.onnx", "model_int8_b8.onnx", "model_int8.ort",
            "model_int8.required_operators.config"} <= names
    assert not any(n.startswith(".") for n in names)  # no staging left


@pytest.mark.slow  # trains the cnn checkpoint (~1.5 min on 2 busy cores)
@pytest.mark.usefixtures("fast_trace")
def test_edge_cnn_int4_and_its_alternative(digits_checkpoint, tmp_path):
    cfg = ExportConfig(formats=["int4", "int4_qdq"], edge=True, **FAST)
    report = run_export(digits_checkpoint("cnn"), tmp_path, cfg, log=lambda _m: None)
    assert report["passed"], report["failures"]
    int4, qdq = report["edge"]["int4"], report["edge"]["int4_qdq"]
    assert "com.microsoft:MatMulNBits" in int4["providers"]["nnapi"]["unsupported_ops"]
    assert qdq["providers"]["nnapi"]["unsupported_ops"] == []
    assert qdq["providers"]["nnapi"]["partitions_fixed_shapes"] == 1
    assert int4["variants"]["ort"]["int4_initializers_stored_as_int8"] > 0  # the int4 Conv weights
    assert report["formats"]["int4_qdq"]["agreement"] >= 0.95
    assert _session(int4["variants"]["ort"]["path"]).get_inputs()[0].name == "input"


def test_int4_qdq_is_the_same_function(onnx_models, tmp_path):
    _, proto = onnx_models["mlp"]
    export_int4(proto, tmp_path / "int4.onnx", accuracy_level=0)  # fp32 compute: the rewrite must be exact
    info = export_int4_qdq(tmp_path / "int4.onnx", tmp_path / "qdq.onnx")
    assert info["dq_matmul_nodes"] == 3 and "MatMulNBits" not in info["graph_op_types"]
    assert onnx.load(str(tmp_path / "qdq.onnx")).opset_import[0].version >= 21
    x = images(16)
    int4 = _session(str(tmp_path / "int4.onnx")).run(None, {"input": x})[0]
    # onnx's reference evaluator runs the DQ -> MatMul graph literally (onnxruntime's CPU provider would fuse it
    # back into MatMulNBits with accuracy level 4); it must match onnxruntime's fp32 MatMulNBits
    qdq = ReferenceEvaluator(str(tmp_path / "qdq.onnx")).run(None, {"input": x})[0]
    np.testing.assert_allclose(int4, qdq, atol=1e-5)


class OnlyInTestsNet(L.LightningModule):
    """A test-only module: flatten, one Linear, GELU, one Linear (no Classifier, no user package)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.GELU(),
                                       torch.nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("case", ["user_resnet", "test_only"])
def test_edge_on_other_modules(case, tmp_path):
    torch.manual_seed(0)
    module, data = ((TinyResNet(width=8), DigitsRows(layout="triple")) if case == "user_resnet"
                    else (OnlyInTestsNet(), DigitsDataModule(batch_size=64)))
    cfg = ExportConfig(formats=["fp32", "int8"], edge=True, thresholds={}, **FAST)
    report = export_module(module, data, tmp_path, cfg, log=lambda _m: None)
    assert set(report["edge"]) == {"fp32", "int8"} and not report["failures"]
    for entry in report["edge"].values():
        assert set(entry["variants"]) == {"b1", "b8", "ort"}
        assert entry["variants"]["ort"]["agreement"] >= 0.95
        assert entry["variants"]["b1"]["providers"]["nnapi"]["supported_nodes"] > 0
    assert report["edge"]["fp32"]["variants"]["b8"]["agreement"] == 1.0


def test_edge_must_be_a_bool():
    with pytest.raises(ValueError, match="edge='yes' is invalid; allowed: true or false"):
        ExportConfig(edge="yes")
