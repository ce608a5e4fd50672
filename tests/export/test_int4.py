"""INT4: Gemm rewritten to MatMul so MatMulNBits really quantizes; Conv weights as int4 DequantizeLinear."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from lp_lightning.export import ExportError, export_int4, gemm_to_matmul
from lp_lightning.export.evaluate import optimized_op_types
from lp_lightning.export.onnx_fp32 import run_onnx, to_onnx
from tests.export.conftest import images


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def test_naive_matmulnbits_skips_gemm(onnx_models):
    """The pitfall this module exists for: the quantizer leaves Gemm untouched."""
    q = MatMulNBitsQuantizer(_copy(onnx_models["mlp"][1]), bits=4, block_size=32, is_symmetric=True)
    q.process()
    assert not any(n.op_type == "MatMulNBits" for n in q.model.model.graph.node)


def test_gemm_to_matmul_same_outputs_no_stale_initializers(onnx_models):
    proto = _copy(onnx_models["mlp"][1])
    assert gemm_to_matmul(proto) == 3
    assert not any(n.op_type == "Gemm" for n in proto.graph.node)
    used = {i for n in proto.graph.node for i in n.input}
    assert all(init.name in used for init in proto.graph.initializer)
    x = images(8)
    np.testing.assert_allclose(run_onnx(proto, x), run_onnx(onnx_models["mlp"][1], x), atol=1e-5)


def test_int4_mlp_every_linear_is_matmulnbits(onnx_models, tmp_path):
    model, proto = onnx_models["mlp"]
    info = export_int4(proto, tmp_path / "m.onnx")
    assert info["matmulnbits_nodes"] == 3 and info["gemm_rewritten"] == 3
    ops = optimized_op_types(tmp_path / "m.onnx")
    assert "MatMulNBits" in ops and "Gemm" not in ops and "FusedGemm" not in ops
    assert (tmp_path / "m.onnx").stat().st_size < 0.3 * len(proto.SerializeToString())
    x = images(64)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = run_onnx(tmp_path / "m.onnx", x)
    assert np.abs(out - ref).max() < 0.25 * np.abs(ref).max()  # quantized, yet the same function


def test_int4_conv_weights_are_int4_dequantizelinear(onnx_models, tmp_path):
    model, proto = onnx_models["cnn"]
    info = export_int4(proto, tmp_path / "c.onnx")
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert info["conv_int4_weights"] == n_conv
    saved = onnx.load(str(tmp_path / "c.onnx"))
    assert max(o.version for o in saved.opset_import if o.domain in ("", "ai.onnx")) >= 21
    int4 = [i for i in saved.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len(int4) >= 2 * n_conv  # weights and zero points
    q = onnx.numpy_helper.to_array(next(i for i in int4 if i.name.endswith("__int4")))
    assert q.min() >= -8 and q.max() <= 7
    dq = [n for n in saved.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == n_conv and all(n.output[0] in {c.input[1] for c in saved.graph.node if c.op_type == "Conv"}
                                     for n in dq)
    x = images(32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(run_onnx(tmp_path / "c.onnx", x) - ref).max() < 0.25 * np.abs(ref).max()


def test_int4_refuses_a_model_with_nothing_to_quantize(tmp_path):
    x = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 64])
    y = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 64])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["input"], ["logits"])], "g", [x], [y])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)])
    with pytest.raises(ExportError, match="quantized no weight"):
        export_int4(proto, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_int4_learned_per_group_scales_reproduce_snapped_weights(onnx_models, tmp_path, accuracy_level):
    """Weights on a learned int4 grid (FakeQuantPrecision int4w) go into MatMulNBits exactly."""
    snapped = copy.deepcopy(onnx_models["mlp"][0])
    qparams = {}
    with torch.no_grad():
        for name in ("net.features.1", "net.features.4", "net.classifier"):  # in_features 64, 64, 32
            w = dict(snapped.named_modules())[name].weight
            scale = w.abs().reshape(len(w), -1, 32).amax(2) / 7
            s = scale.repeat_interleave(32, 1)
            w.copy_((w / s).round().clamp(-8, 7) * s)
            qparams[name] = {"weight_scale": scale, "bits": 4, "granularity": "per_group", "group_size": 32}
    proto = to_onnx(snapped, torch.randn(2, 1, 8, 8))
    info = export_int4(proto, tmp_path / "m.onnx", accuracy_level=accuracy_level, qparams=qparams)
    assert info["learned_matmulnbits"] == 3 and info["calibration"] == "learned" and info["matmulnbits_nodes"] == 3
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    np.testing.assert_allclose(inits["net.features.1.weight__matmul__nbits_scale"],
                               qparams["net.features.1"]["weight_scale"].reshape(-1).numpy(), rtol=1e-6)
    x = images(16)
    with torch.no_grad():
        ref = snapped(torch.from_numpy(x)).numpy()
    # fp32 compute (level 0) reproduces the snapped model; level 4 also quantizes the inputs to int8
    atol = 1e-4 if accuracy_level == 0 else 0.05 * float(np.abs(ref).max())
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", x), ref, atol=atol)


@pytest.mark.parametrize("block_size", [8, 48])
def test_int4_quantizer_failure_is_an_export_error(onnx_models, tmp_path, block_size):
    """onnxruntime's RuntimeError for a block size MLAS cannot handle becomes a one-line ExportError."""
    with pytest.raises(ExportError, match=f"int4 MatMulNBitsQuantizer failed \\(block_size={block_size},") as info:
        export_int4(onnx_models["mlp"][1], tmp_path / "m.onnx", block_size=block_size)
    assert "\n" not in str(info.value) and "[16, 32, 64, 128, 256]" in str(info.value)
    assert list(tmp_path.iterdir()) == []
