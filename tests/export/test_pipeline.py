"""run_export on trained digits checkpoints: report keys, files, agreement, Lemma 1, cleanup on failure."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lp_lightning.export import ExportConfig, ExportError, run_export
from lp_lightning.export import pipeline as pipeline_mod
from lp_lightning.models import CheckpointError

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
        assert entry["path"] == str(tmp_path / f"model_{fmt}.onnx")  # the final file, not the staging copy
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


@pytest.fixture
def low_agreement(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every evaluated format agree on only half of the samples (a threshold in [0, 1] is missed)."""
    evaluate = pipeline_mod.evaluate_format
    monkeypatch.setattr(pipeline_mod, "evaluate_format", lambda *a, **k: {**evaluate(*a, **k), "agreement": 0.5})


@pytest.mark.usefixtures("fast_trace", "low_agreement")
def test_missed_threshold_still_writes_report(digits_checkpoint, tmp_path):
    cfg = ExportConfig(formats=["int8"], thresholds={"int8": 0.98}, **FAST)
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


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _raise(exc: BaseException):
    def broken(*args, **kwargs):
        raise exc

    return broken


@pytest.mark.parametrize(("step", "exc"), [("export_int4", ExportError("int4 broke")),
                                           ("measure_latency", KeyboardInterrupt())])
@pytest.mark.usefixtures("fast_trace")
def test_failed_reexport_keeps_the_previous_export(digits_checkpoint, tmp_path, monkeypatch, step, exc):
    """A re-export that fails (also by Ctrl-C, after every model was written) leaves the old files as they were."""
    ckpt = digits_checkpoint("mlp")
    run_export(ckpt, tmp_path, ExportConfig(formats=["fp32", "int8"], **FAST), log=lambda s: None)
    before = _files(tmp_path)
    monkeypatch.setattr(pipeline_mod, step, _raise(exc))
    with pytest.raises(type(exc)):
        run_export(ckpt, tmp_path, ExportConfig(seed=1, **FAST), log=lambda s: None)
    assert _files(tmp_path) == before  # no staging folder left, no model replaced or deleted
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert all(os.path.getsize(e["path"]) == e["size_bytes"] for e in report["formats"].values())


@pytest.mark.usefixtures("fast_trace")
def test_crash_while_moving_models_leaves_no_report(digits_checkpoint, tmp_path, monkeypatch):
    ckpt = digits_checkpoint("mlp")
    run_export(ckpt, tmp_path, ExportConfig(formats=["fp32", "int8"], **FAST), log=lambda s: None)
    replace = os.replace

    def crash_on_int8(src, dst):
        if Path(dst) == tmp_path / "model_int8.onnx":
            raise OSError(28, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(pipeline_mod.os, "replace", crash_on_int8)
    with pytest.raises(OSError, match="No space"):
        run_export(ckpt, tmp_path, ExportConfig(formats=["fp32", "int8"], **FAST), log=lambda s: None)
    assert sorted(os.listdir(tmp_path)) == ["model_fp32.onnx", "model_int8.onnx"]  # no report naming a mix


@pytest.mark.usefixtures("fast_trace")
def test_failure_removes_every_folder_level_it_created(digits_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline_mod, "export_int8", _raise(ExportError("int8 broke")))
    with pytest.raises(ExportError, match="int8 broke"):
        run_export(digits_checkpoint("mlp"), tmp_path / "deep" / "a" / "b", ExportConfig(**FAST), log=lambda s: None)
    assert os.listdir(tmp_path) == []


def test_bad_checkpoint_creates_no_folder(tmp_path):
    ckpt = tmp_path / "nodir" / "sub" / "x.ckpt"
    with pytest.raises(CheckpointError, match="does not exist"):
        run_export(ckpt, ckpt.parent / "export", log=lambda s: None)  # lp-export's default out_dir
    assert os.listdir(tmp_path) == []


def test_bad_data_hparams_name_the_checkpoint(digits_checkpoint, tmp_path):
    ckpt = torch.load(digits_checkpoint("mlp"), weights_only=True)
    ckpt["hyper_parameters"]["data"] = {"name": "digits", "bogus": 1}
    torch.save(ckpt, tmp_path / "baddata.ckpt")
    with pytest.raises(CheckpointError, match=r"'.*baddata\.ckpt'.*hyper_parameters\.data.*bogus"):
        run_export(tmp_path / "baddata.ckpt", tmp_path / "out", log=lambda s: None)
    assert os.listdir(tmp_path) == ["baddata.ckpt"]


NAN = float("nan")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"formats": ["fp16"]}, "formats"), ({"formats": []}, "formats"), ({"formats": "int8"}, "formats='int8'"),
    ({"threads": 0}, "threads=0"), ({"warmup": -1}, "warmup=-1 must be an integer >= 0"), ({"seed": "x"}, "seed='x'"),
    ({"thresholds": {"int2": 0.9}}, "int2"), ({"thresholds": {"int8": "abc"}}, r"thresholds\.int8='abc'.*\[0, 1\]"),
    ({"thresholds": {"int8": 1.01}}, r"thresholds\.int8=1\.01"), ({"thresholds": {"int4": NAN}}, "int4=nan"),
    ({"thresholds": {"int8": True}}, "int8=True"), ({"thresholds": 0.9}, "thresholds=0.9 must be a mapping"),
    ({"latency_batch_sizes": [0]}, "latency_batch_sizes"), ({"latency_batch_sizes": 1}, "latency_batch_sizes=1 "),
    ({"latency_batch_sizes": [1.5]}, r"latency_batch_sizes=\[1\.5\]"), ({"latency_batch_sizes": []}, r"=\[\]"),
    ({"latency_batch_sizes": [True]}, r"=\[True\]"),
    ({"parity_atol": NAN}, "parity_atol=nan must be a finite number > 0"), ({"parity_atol": float("inf")}, "inf"),
    ({"parity_atol": -1e-4}, "parity_atol=-0.0001"), ({"parity_atol": 0.0}, "parity_atol=0.0"),
    ({"parity_atol": "1e-4"}, "parity_atol='1e-4'"),
    ({"int4_block_size": 48}, r"int4_block_size=48 is invalid; allowed: \[16, 32, 64, 128, 256\]"),
    ({"int4_block_size": 8}, "int4_block_size=8"), ({"int4_block_size": 512}, "int4_block_size=512"),
    ({"int4_accuracy_level": 9}, r"int4_accuracy_level=9 is invalid; allowed: \[0, 1, 2, 3, 4\]"),
    ({"int4_accuracy_level": 1.0}, "int4_accuracy_level=1.0"),
    ({"reduce_range": "maybe"}, "reduce_range='maybe' is invalid; allowed: true, false or null"),
    ({"reduce_range": 0.5}, "reduce_range=0.5"), ({"reduce_range": 1}, "reduce_range=1"),
])
def test_config_validation_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExportConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"int4_block_size": b} for b in (16, 32, 64, 128, 256)]
                         + [{"reduce_range": r} for r in (None, True, False)]
                         + [{"int4_accuracy_level": 0}, {"thresholds": {"int8": 1, "int4": 0}},
                            {"parity_atol": 1}, {"latency_batch_sizes": [3]}, {"warmup": 0}])
def test_config_accepts_valid_values(kwargs):
    assert ExportConfig(**kwargs)


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
