"""run_export on trained digits checkpoints: report keys, files, agreement, Lemma 1, cleanup on failure."""

from __future__ import annotations

import json
import os

import pytest

from lp_lightning.export import ExportConfig, run_export
from lp_lightning.export import pipeline as pipeline_mod

DESIGN_KEYS = {"path", "size_bytes", "accuracy", "agreement", "certified_fraction", "max_abs_logit_diff",
               "latency_ms_p50", "latency_ms_p90", "batch_size", "threads", "op_types"}
FAST = {"iters": 3, "warmup": 1, "calib_batches": 2}


@pytest.mark.parametrize(("net", "int8_kernel"), [
    ("mlp", "QGemm"),
    pytest.param("cnn", "QLinearConv", marks=pytest.mark.slow),
    pytest.param("vit", "QGemm", marks=pytest.mark.slow),
])
@pytest.mark.usefixtures("fast_trace")
def test_run_export_report(digits_checkpoint, tmp_path, net, int8_kernel):
    report = run_export(digits_checkpoint(net), tmp_path, ExportConfig(**FAST), log=lambda s: None)
    on_disk = json.loads((tmp_path / "export_report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(on_disk) >= {"formats", "cpu"} and on_disk["passed"] and on_disk["failures"] == []
    assert {"flags", "vnni", "model_name"} <= set(on_disk["cpu"])
    assert sorted(os.listdir(tmp_path)) == ["export_report.json", "model_fp32.onnx", "model_int4.onnx",
                                            "model_int8.onnx"]  # no temp or side files left
    formats = on_disk["formats"]
    for fmt, entry in formats.items():
        assert set(entry) >= DESIGN_KEYS, fmt
        assert entry["size_bytes"] == os.path.getsize(entry["path"])
        assert entry["batch_size"] == 1 and entry["threads"] == 1
        assert set(entry["latency_ms"]) == {"1", "64"}
        assert entry["latency_ms_p50"] == entry["latency_ms"]["1"]["p50"] <= entry["latency_ms_p90"]
        assert entry["violations"] == 0  # Lemma 1: certified samples never disagree
        assert entry["certified_fraction"] <= entry["agreement"]
    assert formats["fp32"]["agreement"] == 1.0 and formats["fp32"]["max_abs_logit_diff"] < 1e-4
    assert formats["fp32"]["accuracy"] == pytest.approx(on_disk["pytorch_fp32_accuracy"])
    assert formats["int8"]["agreement"] >= 0.98 and formats["int4"]["agreement"] >= 0.95
    assert formats["int8"]["size_ratio"] < 0.4 and formats["int4"]["size_ratio"] < 0.35
    assert int8_kernel in formats["int8"]["op_types"] and "MatMulNBits" in formats["int4"]["op_types"]
    assert formats["int8"]["quantization"]["calibration"] == "minmax"


@pytest.mark.usefixtures("fast_trace")
def test_missed_threshold_still_writes_report(digits_checkpoint, tmp_path):
    cfg = ExportConfig(formats=["int8"], thresholds={"int8": 1.01}, **FAST)
    report = run_export(digits_checkpoint("mlp"), tmp_path, cfg, log=lambda s: None)
    assert not report["passed"] and "int8: agreement" in report["failures"][0]
    assert sorted(os.listdir(tmp_path)) == ["export_report.json", "model_int8.onnx"]


@pytest.mark.usefixtures("fast_trace")
def test_failed_step_leaves_no_files(digits_checkpoint, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("int4 broke")

    monkeypatch.setattr(pipeline_mod, "export_int4", broken)
    with pytest.raises(RuntimeError, match="int4 broke"):
        run_export(digits_checkpoint("mlp"), tmp_path, ExportConfig(**FAST), log=lambda s: None)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("kwargs", "match"), [({"formats": ["fp16"]}, "formats"), ({"formats": []}, "formats"),
                                               ({"threads": 0}, "threads"), ({"thresholds": {"int2": 0.9}}, "int2"),
                                               ({"latency_batch_sizes": [0]}, "latency_batch_sizes")])
def test_config_validation_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExportConfig(**kwargs)


@pytest.mark.usefixtures("fast_trace")
def test_progress_lines(digits_checkpoint, tmp_path):
    lines: list[str] = []
    run_export(digits_checkpoint("mlp"), tmp_path, ExportConfig(formats=["fp32"], **FAST), log=lines.append)
    assert all(line.startswith("[lp-export]") for line in lines)
    assert any("parity" in line for line in lines) and any("report" in line for line in lines)


def test_table_without_fp32_shows_no_ratio() -> None:
    from lp_lightning.export.report import table

    entry = {"size_bytes": 2048, "accuracy": 0.9, "agreement": 0.99, "certified_fraction": 0.98,
             "max_abs_logit_diff": 0.1, "latency_ms": {"1": {"p50": 0.05}}, "op_types": ["QGemm"]}
    row = table({"formats": {"int8": entry}}).splitlines()[1].split()
    assert row[:3] == ["int8", "2.0", "-"] and "nan" not in row
