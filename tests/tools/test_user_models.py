"""lp-export / lp-audit and their Python API on a user's own LightningModules and DataModules (tests/user_pkg)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch

from lp_lightning import BatchKeys, load_checkpoint
from lp_lightning.audit.tolerance import summarize
from lp_lightning.audit_models import audit_modules
from lp_lightning.export import ExportConfig, export_module
from lp_lightning.precision import FakeQuantPrecision
from lp_lightning.tools import audit as audit_tool
from lp_lightning.tools import export as export_tool
from tests.user_pkg.data import DigitsRows
from tests.user_pkg.models import Regressor, RowTransformer, TinyResNet

RESNET, DATA = "tests.user_pkg.models.TinyResNet", "tests.user_pkg.data.DigitsRows"
DICT_KEYS = ("input_key=image", "target_key=label")
FAST = ("iters=2", "warmup=1", "calib_batches=1", "latency_batch_sizes=[1,8]")


def _fit(root: Path, model: L.LightningModule, layout: str, epochs: int, plugins: list | None = None,
         seed: int = 0) -> Path:
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, plugins=plugins or [],
                        default_root_dir=str(root))
    trainer.fit(model, datamodule=DigitsRows(layout=layout))
    path = root / f"{type(model).__name__}_{seed}.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints of the user package: two ResNets (seeds 0, 1), an int8 QAT Transformer, a regressor."""
    root = tmp_path_factory.mktemp("user_ckpts")
    return {
        "resnet": _fit(root, TinyResNet(width=8), "triple", 3),
        "resnet_b": _fit(root, TinyResNet(width=8), "triple", 3, seed=1),
        "qat": _fit(root, RowTransformer(lr=1e-2), "dict", 3, [FakeQuantPrecision("int8")]),
        "regressor": _fit(root, Regressor(), "regression", 1),
    }


def _run(main: Callable[[], None], monkeypatch: pytest.MonkeyPatch, *overrides: str) -> int:
    monkeypatch.setattr(sys, "argv", ["lp-tool", *overrides])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _test_split(layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    dm = DigitsRows(layout=layout)
    xs, ys = zip(*[(b["image"], b["label"]) if layout == "dict" else (b[0], b[1]) for b in
                   (dm.setup(), dm.test_dataloader())[1]], strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_lp_export_rebuilds_a_user_module_from_class_paths_only(ckpts, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "export"
    code = _run(export_tool.main, monkeypatch, f"ckpt={ckpts['resnet']}", f"model_class={RESNET}",
                f"data._target_={DATA}", "data.batch_size=50", "formats=[fp32,int8]", "thresholds.int8=null",
                f"out_dir={out}", *FAST)
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "export_report.json").read_text())
    x, y = _test_split("triple")  # the DataModule's layout came from the checkpoint's saved hyperparameters
    with torch.no_grad():
        logits = load_checkpoint(TinyResNet, ckpts["resnet"])(x)
    accuracy = float((logits.argmax(1) == y).double().mean())
    assert report["model"] == RESNET and report["data"] == DATA and report["formats"]["fp32"]["n_samples"] == len(y)
    assert report["pytorch_fp32_accuracy"] == pytest.approx(accuracy) and accuracy > 0.8
    assert report["formats"]["fp32"]["agreement"] == 1.0
    assert report["formats"]["fp32"]["accuracy"] == pytest.approx(accuracy, abs=1.5 / len(y))
    assert report["formats"]["int8"]["quantization"]["calibration"] == "minmax"
    assert set(report["formats"]["fp32"]["latency_ms"]) == {"1", "8"}  # both latency batch sizes


def test_export_module_python_api_on_a_qat_transformer_with_dict_batches(ckpts, tmp_path) -> None:
    module = load_checkpoint(RowTransformer, ckpts["qat"])
    assert any(type(m).__name__.startswith("FakeQuant") for m in module.modules())  # the trained fake-quant model
    cfg = ExportConfig(formats=["fp32", "int8"], iters=2, warmup=1, calib_batches=1, thresholds={})
    report = export_module(module, DigitsRows(layout="dict"), tmp_path / "out", cfg,
                           BatchKeys(input_key="image", target_key="label"), log=lambda _m: None)
    int8 = report["formats"]["int8"]
    assert int8["quantization"]["calibration"] == "learned"  # the QAT scales, not a new calibration
    assert int8["agreement_fake_quant"] >= 0.9 and int8["violations"] == 0
    assert report["formats"]["fp32"]["quantization"]["parity_max_abs"] <= 1e-4
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["export_report.json", "model_fp32.onnx",
                                                                      "model_int8.onnx"]


def test_load_checkpoint_returns_the_fake_quant_function_it_trained(ckpts) -> None:
    x, _ = _test_split("dict")
    ckpt = torch.load(ckpts["qat"], weights_only=True)
    fresh = RowTransformer(**ckpt["hyper_parameters"])
    fresh.load_state_dict(ckpt["state_dict"])  # plain Lightning: the latent float weights
    loaded = load_checkpoint(RowTransformer, ckpts["qat"])
    with torch.no_grad():
        fq, plain = loaded(x), fresh.eval()(x)
    assert not torch.equal(fq, plain)  # the fake-quant module is another function than its float weights
    observers = [m for m in loaded.modules() if type(m).__name__ == "MovingAverageMinMaxObserver"]
    assert observers and all(o.initialized for o in observers)  # ranges restored, not fresh


def test_lp_audit_two_user_checkpoints_matches_an_oracle(ckpts, tmp_path, monkeypatch, capsys) -> None:
    code = _run(audit_tool.main, monkeypatch, f"ckpt={ckpts['resnet']}", f"reference={ckpts['resnet_b']}",
                f"model_class={RESNET}", f"data._target_={DATA}", f"out_dir={tmp_path}", "plot=false",
                f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "audit_report.json").read_text())
    x, y = _test_split("triple")
    with torch.no_grad():
        a = load_checkpoint(TinyResNet, ckpts["resnet"])(x).double()
        b = load_checkpoint(TinyResNet, ckpts["resnet_b"])(x).double()
    oracle = summarize(a, b)
    assert report["mode"] == "models" and report["model"] == RESNET and report["n_samples"] == len(y)
    assert report["agreement"] == pytest.approx(float((a.argmax(1) == b.argmax(1)).double().mean()))
    assert report["certified_fraction"] == pytest.approx(oracle["certified_fraction"])
    assert report["accuracy_reference"] == pytest.approx(float((b.argmax(1) == y).double().mean()))


def test_audit_modules_one_module_in_bf16_with_dict_batches(ckpts) -> None:
    module = load_checkpoint(RowTransformer, ckpts["qat"])
    from lp_lightning.quant import dequantize

    plain = dequantize(module)
    dm = DigitsRows(layout="dict")
    dm.setup()
    report, comparison = audit_modules(plain, dm.val_dataloader(), precision="bf16",
                                       keys=BatchKeys(input_key="image", target_key="label"))
    assert report["mode"] == "precisions" and report["low_precision"] == "bf16" and report["violations"] == 0
    assert report["n_samples"] == len(dm.sets["val"]) == len(comparison.tol)
    assert 0.0 < report["err_mean"] < 0.1 and report["accuracy_low"] is not None


@pytest.mark.parametrize("case", ["no_import", "not_a_module", "does_not_fit", "not_a_datamodule", "regression",
                                  "wrong_key"])
def test_bad_user_input_is_one_line_exit_2_and_writes_nothing(case, ckpts, tmp_path, monkeypatch, capsys) -> None:
    args, expect = {
        "no_import": ([f"ckpt={ckpts['resnet']}", "model_class=nopkg.mod.Model", f"data._target_={DATA}"],
                      "model_class='nopkg.mod.Model' does not import"),
        "not_a_module": ([f"ckpt={ckpts['resnet']}", "model_class=collections.OrderedDict", f"data._target_={DATA}"],
                         "not a subclass of lightning.pytorch.core.module.LightningModule"),
        "does_not_fit": ([f"ckpt={ckpts['resnet']}", "model_class=tests.user_pkg.models.Regressor",
                          f"data._target_={DATA}"], "does not fit tests.user_pkg.models.Regressor"),
        "not_a_datamodule": ([f"ckpt={ckpts['resnet']}", f"model_class={RESNET}", f"data._target_={RESNET}"],
                             "not a subclass of lightning.pytorch.core.datamodule.LightningDataModule"),
        "regression": ([f"ckpt={ckpts['regressor']}", "model_class=tests.user_pkg.models.Regressor",
                        f"data._target_={DATA}"], "needs (N, C) classification logits with C >= 2"),
        "wrong_key": ([f"ckpt={ckpts['qat']}", "model_class=tests.user_pkg.models.RowTransformer",
                       f"data._target_={DATA}", "input_key=pixels"], "input_key='pixels' is not a key"),
    }[case]
    out = tmp_path / "out"
    for main, extra in ((export_tool.main, ()), (audit_tool.main, ("precision=bf16", f"hydra.run.dir={tmp_path}"))):
        code = _run(main, monkeypatch, *args, *extra, f"out_dir={out}")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expect in err[0], err
        assert not out.exists()


def test_regression_module_is_refused_by_the_python_api(ckpts) -> None:
    dm = DigitsRows(layout="regression")
    dm.setup()
    with pytest.raises(ValueError, match=r"Regressor.*got a tensor of shape \(.*, 1\) \(a regression output"):
        audit_modules(load_checkpoint(Regressor, ckpts["regressor"]), dm.val_dataloader(), precision="bf16")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "all"])
def test_max_samples_is_refused_before_anything_loads(bad, tmp_path) -> None:
    """The API and lp-audit share one check; lp-audit runs it before reading a checkpoint (none exists here)."""
    from lp_lightning.tools.audit import audit_checkpoints

    with pytest.raises(ValueError, match=r"max_samples=.* must be None \(null: every sample\) or an integer >= 1"):
        audit_modules(torch.nn.Linear(2, 2), [], precision="bf16", max_samples=bad)
    with pytest.raises(ValueError, match=r"max_samples="):
        audit_checkpoints(tmp_path / "missing.ckpt", precision_cfg={"name": "bf16"}, max_samples=bad)
