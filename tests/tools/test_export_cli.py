"""``lp-export`` end to end: success, missed thresholds, and bad input (one line, exit code, no files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lp_lightning.config import compose_config
from lp_lightning.export import ExportError
from lp_lightning.tools import export as export_tool
from tests.export.conftest import cached_to_onnx


def lp_export(monkeypatch: pytest.MonkeyPatch, *overrides: str) -> int:
    """Run ``lp-export`` in-process (Hydra reads sys.argv); returns the exit code."""
    monkeypatch.setattr(sys, "argv", ["lp-export", *overrides])
    try:
        export_tool.main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    from lp_lightning.export import pipeline

    monkeypatch.setattr(pipeline, "to_onnx", cached_to_onnx)


FAST = ("iters=2", "warmup=1", "calib_batches=1")


def test_cli_writes_models_report_and_table(digits_checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code = lp_export(monkeypatch, f"ckpt={digits_checkpoint('mlp')}", f"out_dir={out}", "formats=[fp32,int8]", *FAST)
    printed = capsys.readouterr().out
    assert code == 0
    assert "format" in printed and "int8" in printed and "QGemm" in printed
    report = json.loads((out / "export_report.json").read_text())
    assert set(report["formats"]) == {"fp32", "int8"} and report["passed"]
    assert sorted(os.listdir(out)) == ["export_report.json", "model_fp32.onnx", "model_int8.onnx"]
    assert "edge" not in report and "edge" not in printed  # edge=false (the default) writes nothing extra


def test_cli_edge_variant_mismatch_exit_1_names_the_format(digits_checkpoint, tmp_path, monkeypatch, capsys):
    from lp_lightning.export import edge

    metrics = edge.logit_metrics  # only the edge variants' evaluation is broken: the int8 model itself passes
    monkeypatch.setattr(edge, "logit_metrics", lambda *a, **k: {**metrics(*a, **k), "agreement": 0.5})
    out = tmp_path / "out"
    code = lp_export(monkeypatch, f"ckpt={digits_checkpoint('mlp')}", f"out_dir={out}", "formats=[int8]", "edge=true",
                     "latency_batch_sizes=1", *FAST)
    captured = capsys.readouterr()
    assert code == 1
    assert "threshold missed: int8 (fixed shape b1): agreement 0.5000 < threshold 0.9800" in captured.err
    assert "threshold missed: int8 (ORT format): agreement" in captured.err
    assert "edge int8: NNAPI" in captured.out  # the summary line
    report = json.loads((out / "export_report.json").read_text())
    assert not report["passed"] and report["formats"]["int8"]["agreement"] >= 0.98
    assert report["edge"]["int8"]["variants"]["ort"]["agreement"] == 0.5


def test_cli_missed_threshold_exit_1_report_written(digits_checkpoint, tmp_path, monkeypatch, capsys):
    from lp_lightning.export import pipeline

    evaluate = pipeline.evaluate_format  # agreement 0.5: a threshold in [0, 1] that is surely missed
    monkeypatch.setattr(pipeline, "evaluate_format", lambda *a, **k: {**evaluate(*a, **k), "agreement": 0.5})
    out = tmp_path / "out"
    code = lp_export(monkeypatch, f"ckpt={digits_checkpoint('mlp')}", f"out_dir={out}", "formats=[int8]",
                     "thresholds.int8=0.9", *FAST)
    assert code == 1
    assert "threshold missed: int8: agreement" in capsys.readouterr().err
    assert json.loads((out / "export_report.json").read_text())["failures"]


def _bad_checkpoints(tmp: Path, marker: Path) -> dict[str, Path]:
    empty, corrupt, no_hparams, evil = (tmp / n for n in ("empty.ckpt", "corrupt.ckpt", "nohp.ckpt", "evil.ckpt"))
    empty.write_bytes(b"")
    corrupt.write_bytes(b"this is not a zip archive nor a pickle")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, no_hparams)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {}, "hyper_parameters": {"net": "mlp"}, "payload": Evil()}, evil)
    return {"missing": tmp / "nope.ckpt", "empty": empty, "corrupt": corrupt, "no_hparams": no_hparams,
            "evil": evil}


@pytest.mark.parametrize(("case", "match"), [("missing", "does not exist"), ("empty", "is empty"),
                                             ("corrupt", "corrupt"), ("no_hparams", "hyperparameters"),
                                             ("evil", "weights_only")])
def test_cli_bad_checkpoint(case, match, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    ckpt = _bad_checkpoints(tmp_path, marker)[case]
    out = tmp_path / "out"
    code = lp_export(monkeypatch, f"ckpt={ckpt}", f"out_dir={out}")
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and match in err and ckpt.name in err
    assert not marker.exists()  # the pickled payload never ran
    assert not out.exists()  # not even an empty out_dir


@pytest.mark.parametrize(("override", "match"), [
    ("formats=[fp32,int2]", "int2"), ("threads=0", "threads"),
    ("int4_block_size=48", "int4_block_size=48 is invalid; allowed: [16, 32, 64, 128, 256]"),
    ("int4_block_size=8", "int4_block_size=8"),
    ("latency_batch_sizes=[1.5]", "latency_batch_sizes=[1.5] must be a non-empty list of integers >= 1"),
    ("latency_batch_sizes=[]", "latency_batch_sizes=[]"),
    ("parity_atol=nan", "parity_atol=nan must be a finite number > 0"), ("parity_atol=-1e-4", "parity_atol=-0.0001"),
    ("reduce_range=maybe", "reduce_range='maybe' is invalid; allowed: true, false or null"),
    ("reduce_range=0.5", "reduce_range=0.5"), ("edge=maybe", "edge='maybe' is invalid; allowed: true or false"),
    ("int4_accuracy_level=9", "int4_accuracy_level=9 is invalid; allowed: [0, 1, 2, 3, 4]"),
    ("thresholds.int8=abc", "thresholds.int8='abc' must be a number in [0, 1]"),
    ("thresholds.int8=1.5", "thresholds.int8=1.5"), ("thresholds=0.9", "thresholds=0.9 must be a mapping"),
])
def test_cli_bad_values(override, match, digits_checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code = lp_export(monkeypatch, f"ckpt={digits_checkpoint('mlp')}", f"out_dir={out}", override)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and match in err and "Traceback" not in err
    assert not out.exists()


def test_cli_shorthands(digits_checkpoint):
    cfg = compose_config("export", [f"ckpt={digits_checkpoint('mlp')}", "latency_batch_sizes=1", "formats=int8",
                                    "thresholds.int4=null"])
    export_cfg = export_tool.export_config(cfg)
    assert list(export_cfg.latency_batch_sizes) == [1] and list(export_cfg.formats) == ["int8"]
    assert dict(export_cfg.thresholds) == {"int8": 0.98, "int4_qdq": 0.95}


@pytest.mark.parametrize("exc", [TypeError("bad type\nsecond line"), ExportError("step failed:\n  the cause")])
def test_cli_error_is_one_line_with_its_whole_message(exc, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise exc

    monkeypatch.setattr(export_tool, "run_export", broken)
    code = lp_export(monkeypatch, f"ckpt={tmp_path / 'x.ckpt'}")
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"lp-export: error: {' '.join(line.strip() for line in str(exc).splitlines())}"


def test_cli_bad_input_leaves_no_folders(tmp_path, monkeypatch, capsys):
    """Neither the default out_dir (<checkpoint folder>/export) nor any parent of out_dir is created."""
    assert lp_export(monkeypatch, f"ckpt={tmp_path / 'nodir' / 'sub' / 'x.ckpt'}") == 2
    assert lp_export(monkeypatch, f"ckpt={tmp_path / 'missing.ckpt'}", f"out_dir={tmp_path / 'deep' / 'a' / 'b'}") == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
    assert os.listdir(tmp_path) == []


def test_cli_bad_data_hparams_name_the_checkpoint(digits_checkpoint, tmp_path, monkeypatch, capsys):
    ckpt = torch.load(digits_checkpoint("mlp"), weights_only=True)
    ckpt["hyper_parameters"]["data"] = {"name": "digits", "bogus": 1}
    torch.save(ckpt, tmp_path / "baddata.ckpt")
    code = lp_export(monkeypatch, f"ckpt={tmp_path / 'baddata.ckpt'}", f"out_dir={tmp_path / 'out'}")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "baddata.ckpt" in err and "hyper_parameters.data" in err
    assert os.listdir(tmp_path) == ["baddata.ckpt"]


def test_cli_state_dict_mismatch_keeps_the_cause(digits_checkpoint, tmp_path, monkeypatch, capsys):
    ckpt = torch.load(digits_checkpoint("mlp"), weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if "classifier" not in k}
    torch.save(ckpt, tmp_path / "partial.ckpt")
    code = lp_export(monkeypatch, f"ckpt={tmp_path / 'partial.ckpt'}", f"out_dir={tmp_path / 'out'}")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "partial.ckpt" in err
    assert "Missing key(s)" in err and "classifier" in err  # the cause, from the error's second line


def test_cli_unwritable_out_dir(digits_checkpoint, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    code = lp_export(monkeypatch, f"ckpt={digits_checkpoint('mlp')}", f"out_dir={blocker / 'sub'}")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "out_dir" in err and "sub" in err


def test_cli_requires_ckpt(monkeypatch, capsys):
    assert lp_export(monkeypatch) == 2
    assert "ckpt=PATH is required" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script(digits_checkpoint, tmp_path):
    exe = Path(sys.executable).parent / "lp-export"
    proc = subprocess.run([str(exe), f"ckpt={digits_checkpoint('mlp')}", f"out_dir={tmp_path}", *FAST],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "export_report.json").is_file() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("override", ["foo=1", "thresholds.int16=0.5"])
def test_a_command_line_hydra_cannot_compose_exits_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     override: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert lp_export(monkeypatch, "ckpt=x.ckpt", override) == 2  # Hydra's own error; 1 means a threshold missed
    assert not any(tmp_path.iterdir())
