"""evaluate_format: samples whose ONNX logits are not finite count as wrong, and never as agreement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from lp_lightning.export.evaluate import evaluate_format
from lp_lightning.io import write_json


def _log_model(path: Path) -> Path:
    """logits = log(x): a negative input gives NaN logits, a zero gives -inf."""
    graph = helper.make_graph([helper.make_node("Log", ["x"], ["logits"])], "log",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_nonfinite_rows_are_counted_and_never_agree(tmp_path: Path) -> None:
    x = np.array([[1.0, 2.0, 3.0], [-1.0, 5.0, 1.0], [4.0, 1.0, 2.0], [3.0, 0.0, 1.0]], dtype=np.float32)
    y = np.array([2, 1, 0, 0])
    ref = np.log(np.abs(x) + 1e-3).astype(np.float32)  # argmax 2, 1, 0, 0: what a finite model would give
    metrics = evaluate_format(_log_model(tmp_path / "log.onnx"), x, y, ref, other_refs={"copy": ref})
    assert metrics["nonfinite"] == 2  # the NaN row and the -inf row
    assert metrics["accuracy"] == metrics["agreement"] == metrics["agreement_copy"] == 0.5
    finite_diff = np.abs(np.log(x[[0, 2]]) - ref[[0, 2]]).max()
    assert np.isclose(metrics["max_abs_logit_diff"], finite_diff) and np.isfinite(metrics["max_abs_logit_diff"])
    assert metrics["violations"] == 0
    text = write_json(tmp_path / "m.json", metrics).read_text()
    assert "NaN" not in text and "Infinity" not in text and json.loads(text)["nonfinite"] == 2  # standard JSON
