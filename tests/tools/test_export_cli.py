"""``lp-export`` end to end: success, missed thresholds, and bad input (one line, exit code, no files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_cli_missed_threshold_exit_1_report_written(digits_checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code = lp_export(monkeypatch, f"ckpt={digits_checkpoint('mlp')}", f"out_dir={out}", "formats=[int8]",
                     "thresholds.int8=1.01", *FAST)
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


@pytest.mark.parametrize(("override", "match"), [("formats=[fp32,int2]", "int2"), ("threads=0", "threads")])
def test_cli_bad_values(override, match, digits_checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code = lp_export(monkeypatch, f"ckpt={digits_checkpoint('mlp')}", f"out_dir={out}", override)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and match in err
    assert not out.exists()


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
