"""lp-audit: one checkpoint in two precisions, two checkpoints, bad input (one line, exit 2, no report)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lp_lightning.audit.tolerance import REPORT_KEYS
from lp_lightning.config import compose_config
from lp_lightning.models import Classifier
from lp_lightning.tools import audit as audit_tool


def _compose(overrides: list[str]):
    return compose_config("audit", overrides)


def _main(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *overrides: str) -> int:
    """Run the Hydra entry point in-process; return its exit code."""
    monkeypatch.setattr(sys, "argv", ["lp-audit", *overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    try:
        audit_tool.main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp16_mixed", "bf16_mixed"])
def test_cnn_digits_in_low_precision_vs_fp32(digits_checkpoint: Callable[[str], Path], tmp_path: Path,
                                            precision: str) -> None:
    cfg = _compose([f"ckpt={digits_checkpoint('cnn')}", f"precision={precision}"])
    report = audit_tool.run(cfg, tmp_path, precision)
    assert report["violations"] == 0 and report["nonfinite"] == 0 and report["n_samples"] == 270
    assert report["agreement"] >= report["certified_fraction"]
    if precision == "fp16":  # the target: fp16 vs fp32 on digits certifies >= 95% of test samples
        assert report["certified_fraction"] >= 0.95
    assert report["err_max"] > 0  # the low precision really ran (not the fp32 model twice)
    assert report["low_precision"] == precision and report["reference_precision"] == "float32"
    saved = json.loads((tmp_path / audit_tool.REPORT_NAME).read_text())
    assert saved == report and list(saved)[: len(REPORT_KEYS)] == list(REPORT_KEYS)
    assert (tmp_path / audit_tool.PLOT_NAME).read_bytes()[:4] == b"\x89PNG"


def _perturbed_copy(ckpt: Path, path: Path, scale: float = 0.05) -> Path:
    """A second model: the checkpoint with noise on every floating weight (no training needed)."""
    raw = torch.load(ckpt, weights_only=True)
    g = torch.Generator().manual_seed(0)
    raw["state_dict"] = {k: v + scale * v.std().nan_to_num() * torch.randn(v.shape, generator=g)
                         if v.is_floating_point() and v.numel() > 1 else v for k, v in raw["state_dict"].items()}
    torch.save(raw, path)
    return path


def test_two_models_and_main_prints_table(digits_checkpoint: Callable[[str], Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    a = digits_checkpoint("cnn")
    b = _perturbed_copy(a, tmp_path / "other.ckpt")
    out = tmp_path / "out"
    code = _main(monkeypatch, tmp_path, f"ckpt={a}", f"reference={b}", "reference_dtype=float64",
                 "max_samples=100", f"out_dir={out}")
    assert code == 0
    printed = capsys.readouterr().out
    assert "certified_fraction" in printed and "(models, test)" in printed
    report = json.loads((out / audit_tool.REPORT_NAME).read_text())
    assert report["mode"] == "models" and report["reference_ckpt"] == str(b) and report["n_samples"] == 100
    assert report["violations"] == 0 and report["certified_fraction"] <= report["agreement"] < 1.0 + 1e-12
    assert report["err_mean"] > 1e-3  # two different networks, not one model twice


def _other_classes_checkpoint(path: Path) -> Path:
    model = Classifier(net="mlp", input_shape=[1, 8, 8], num_classes=3, data={"name": "digits"})
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


def _bad_data_checkpoint(good: Path, path: Path) -> Path:
    ckpt = torch.load(good, weights_only=True)
    ckpt["hyper_parameters"]["data"] = {"name": "digits", "bogus": 1}
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("case", ["missing", "corrupt", "classes", "no_precision", "bad_reference_dtype",
                                  "batch_size", "bad_data"])
def test_bad_input_one_line_exit_2_no_report(digits_checkpoint: Callable[[str], Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                             case: str) -> None:
    good = digits_checkpoint("cnn")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint at all")
    overrides, expect = {
        "missing": ([f"ckpt={tmp_path / 'nope.ckpt'}", "precision=fp16"], "nope.ckpt' does not exist"),
        "corrupt": ([f"ckpt={good}", f"reference={corrupt}"], "corrupt.ckpt"),
        "classes": ([f"ckpt={good}", f"reference={_other_classes_checkpoint(tmp_path / 'three.ckpt')}"],
                    "three.ckpt' vs ckpt"),
        "no_precision": ([f"ckpt={good}"], "needs precision="),
        "bad_reference_dtype": ([f"ckpt={good}", "precision=fp16", "reference_dtype=float16"],
                                "reference='float16'"),
        "batch_size": ([f"ckpt={good}", "precision=fp16", "batch_size=abc"], "batch_size='abc' must be an integer"),
        "bad_data": ([f"ckpt={_bad_data_checkpoint(good, tmp_path / 'data.ckpt')}", "precision=fp16"],
                     "data.ckpt': hyper_parameters.data does not build a datamodule"),
    }[case]
    code = _main(monkeypatch, tmp_path, *overrides, f"out_dir={tmp_path / 'out'}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("lp-audit: error:") and expect in err[0], err
    assert not (tmp_path / "out").exists()  # no partial report


@pytest.mark.parametrize("override", ["precision=fp64", "max_sample=10"])
def test_a_command_line_hydra_cannot_compose_exits_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     override: str) -> None:
    assert _main(monkeypatch, tmp_path, "ckpt=x.ckpt", override) == 2  # Hydra's own error; 1 means violations


def test_console_script_exit_code(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "lp-audit"
    proc = subprocess.run([str(exe), f"ckpt={tmp_path / 'missing.ckpt'}", "precision=fp16",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("lp-audit: error: checkpoint")
    assert not (tmp_path / "run" / audit_tool.REPORT_NAME).exists()


def test_a_fake_quant_checkpoint_as_stored_is_labelled_fake_quant(tmp_path: Path) -> None:
    from lp_lightning.precision import FakeQuantPrecision
    from tests.conftest import fit_classifier

    _, _, qat = fit_classifier(tmp_path / "qat", epochs=1, plugins=[FakeQuantPrecision()], limit_train_batches=3)
    _, _, plain = fit_classifier(tmp_path / "plain", epochs=1, limit_train_batches=3)
    report, _ = audit_tool.audit_checkpoints(qat, reference=plain, max_samples=64)
    assert report["low_precision"] == "as stored (fake-quant weight=int8 activation=int8)"
    report, _ = audit_tool.audit_checkpoints(plain, reference=qat, max_samples=64)
    assert report["low_precision"] == "as stored (fp32)" and report["violations"] == 0
