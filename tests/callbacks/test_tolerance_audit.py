"""ToleranceAudit: reports and files per audited epoch, untouched training state, DDP, bad input."""

from __future__ import annotations

import contextlib
import copy
import json
import random
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import nn

from lp_lightning.audit.tolerance import REPORT_KEYS, summary
from lp_lightning.callbacks import EpsilonGuard, ToleranceAudit
from lp_lightning.callbacks import tolerance_audit as ta
from lp_lightning.callbacks.audit_support import check_logits
from lp_lightning.data import DigitsDataModule
from lp_lightning.models import Classifier
from lp_lightning.precision import PureHalfPrecision
from tests.ddp import run_ddp_script

FAST = dict(limit_train_batches=4, limit_val_batches=2)  # 2 val batches of 64 = 128 audited samples


def _fit(root: Path, callbacks: list, epochs: int = 2, plugins: list | None = None, logger=False,
         net: str = "mlp", net_kwargs: dict | None = None, **kw) -> tuple[Classifier, L.Trainer]:
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64)
    model = Classifier(net=net, input_shape=list(dm.input_shape), num_classes=dm.num_classes,
                       net_kwargs=net_kwargs or {}, optimizer={"name": "adam", "lr": 1e-3, "eps": 1e-4})
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=str(root),
                        logger=logger, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, plugins=plugins or [], callbacks=callbacks, **{**FAST, **kw})
    trainer.fit(model, datamodule=dm)
    return model, trainer


def _reports(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


@pytest.mark.parametrize(("plugins", "low"), [
    ([], "32-true (float32)"), ([PureHalfPrecision("float16")], "PureHalfPrecision (float16)"),
    ([PureHalfPrecision("bfloat16")], "PureHalfPrecision (bfloat16)"),
    ([MixedPrecision("bf16-mixed", device="cpu")], "bf16-mixed"),
], ids=["fp32", "fp16", "bf16", "bf16_mixed"])
def test_reports_logs_and_files_per_epoch(tmp_path: Path, plugins: list, low: str) -> None:
    audit = ToleranceAudit(reference="float64")
    model, trainer = _fit(tmp_path, [audit], plugins=plugins)
    reports = _reports(tmp_path / "audit")
    assert list(reports) == ["epoch_000", "epoch_001"]
    assert sorted(p.name for p in (tmp_path / "audit").glob("*.png")) == ["epoch_000.png", "epoch_001.png"]
    assert not list((tmp_path / "audit").glob(".*"))  # no temp files left behind
    r = reports["epoch_001"]
    assert list(r)[: len(REPORT_KEYS)] == list(REPORT_KEYS)
    assert r["n_samples"] == 128 and r["violations"] == 0 and r["nonfinite"] == 0
    assert 0.5 <= r["certified_fraction"] <= r["agreement"] <= 1.0
    assert r["reference_precision"] == "float64" and r["epoch"] == 1
    assert r["low_precision"] == low
    if plugins:
        assert r["err_max"] > 0  # a 16-bit model differs from its float64 reference
    for key in ta.LOGGED:
        assert float(trainer.callback_metrics[f"audit/{key}"]) == pytest.approx(r[key], rel=1e-6)
    assert audit.last_report == r and audit.last_source == "captured"
    # the logits recorded during validation equal the explicit recompute (forward_context + convert_input)
    assert summary(audit.audit(trainer, model)) == {k: r[k] for k in REPORT_KEYS}
    assert audit.last_source == "recomputed"


class _TwoForwards(Classifier):
    def validation_step(self, batch, batch_idx):
        self(batch[0])  # an extra forward per step: the audit must not trust the recorded logits
        return super().validation_step(batch, batch_idx)


def test_every_n_epochs_max_samples_and_logger_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "Classifier", _TwoForwards)
    logger = CSVLogger(str(tmp_path), name="logs")
    audit = ToleranceAudit(every_n_epochs=2, max_samples=70, plot=False)
    _fit(tmp_path, [audit], epochs=3, logger=logger)
    assert audit.last_source == "recomputed"
    folder = Path(logger.log_dir) / "audit"
    assert list(_reports(folder)) == ["epoch_001"] and not list(folder.glob("*.png"))
    assert _reports(folder)["epoch_001"]["n_samples"] == 70
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {f"audit/{k}" for k in ta.LOGGED} <= set(metrics)


def test_several_validations_per_epoch_keep_every_report(tmp_path: Path) -> None:
    _fit(tmp_path, [ToleranceAudit(plot=False)], epochs=1, val_check_interval=2)  # after steps 2 and 4
    reports = _reports(tmp_path / "audit")
    assert list(reports) == ["epoch_000", "epoch_000_step_000004"]
    assert [r["global_step"] for r in reports.values()] == [2, 4]


def _final_state(trainer: L.Trainer, model: Classifier) -> tuple:
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(trainer.optimizers[0].state_dict()),
            torch.rand(4), float(np.random.rand()), random.random())


def _assert_same(a: tuple, b: tuple) -> None:
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    for pa, pb in zip(a[1]["state"].values(), b[1]["state"].values(), strict=True):
        for k in pa:
            assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), k
    assert torch.equal(a[2], b[2]) and a[3:] == b[3:]


def test_audit_leaves_weights_optimizer_and_rng_untouched(tmp_path: Path, monkeypatch) -> None:
    dropout = {"dropout": 0.3}  # dropout draws from the global RNG, so a consumed stream changes the weights
    model, trainer = _fit(tmp_path / "a", [], epochs=2, net_kwargs=dropout)
    plain = _final_state(trainer, model)
    model, trainer = _fit(tmp_path / "b", [ToleranceAudit(plot=False)], epochs=2, net_kwargs=dropout)
    assert model.training  # train mode is restored after each audit
    _assert_same(plain, _final_state(trainer, model))
    # the test can fail: without restoring the RNG streams, iterating the val loader shifts them
    monkeypatch.setattr(ta, "rng_preserved", contextlib.nullcontext)
    model, trainer = _fit(tmp_path / "c", [ToleranceAudit(plot=False)], epochs=2, net_kwargs=dropout)
    with pytest.raises(AssertionError):
        _assert_same(plain, _final_state(trainer, model))


def test_cnn_batchnorm_and_train_modes_restored(tmp_path: Path) -> None:
    model, trainer = _fit(tmp_path, [], epochs=1, net="cnn")
    before = copy.deepcopy(model.state_dict())
    model.train()
    model.net.classifier.eval()  # a mixed train/eval state must come back exactly
    modes = [m.training for m in model.modules()]
    audit = ToleranceAudit(reference="float64")
    comparison = audit.audit(trainer, model)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN running stats too
    assert int(comparison.certified.sum()) > 0 and len(comparison.err) == 128
    assert float(comparison.err.max()) < 1e-5  # float32 vs float64 of the same weights
    with torch.no_grad():  # the cached reference copy follows the weights it is given
        for p in model.parameters():
            p.mul_(1.5)
    assert summary(audit.audit(trainer, model)) == summary(ToleranceAudit(reference="float64").audit(trainer, model))
    assert float(audit.audit(trainer, model).err.max()) < 1e-5


class _RecordingPlugin(Precision):
    """A plugin implementing the reference protocol: the reference is a copy with a shifted bias."""

    def __init__(self) -> None:
        self.calls: list[torch.dtype] = []

    def reference_module(self, module: nn.Module, dtype: torch.dtype) -> nn.Module:
        self.calls.append(dtype)
        ref = copy.deepcopy(module).to(dtype)
        with torch.no_grad():
            ref.net.classifier.bias[0] += 100.0  # every sample's reference predicts class 0
        return ref


def test_plugin_reference_module_is_used(tmp_path: Path) -> None:
    plugin = _RecordingPlugin()
    model, _ = _fit(tmp_path, [ToleranceAudit(reference="float64", plot=False)], epochs=1, plugins=[plugin])
    assert plugin.calls == [torch.float64]
    r = _reports(tmp_path / "audit")["epoch_000"]
    assert r["err_max"] > 0.5 and r["agreement"] < 0.5 and r["violations"] == 0
    assert float(model.net.classifier.bias.detach()[0]) < 10  # the trained module itself was not touched


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"reference": "float16"}, "reference='float16'.*higher precision"),
    ({"reference": "bfloat16"}, "reference='bfloat16'.*higher precision"),
    ({"reference": "float128"}, r"reference='float128'.*\['float32', 'float64'\]"),
    ({"every_n_epochs": 0}, "every_n_epochs=0"),
    ({"max_samples": 0}, "max_samples=0"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ToleranceAudit(**kwargs)


def test_reference_not_higher_than_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not higher than the model's precision torch.float64"):
        _fit(tmp_path, [ToleranceAudit(reference="float32")], epochs=1, precision="64-true")


class _BadOutput(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1)).view(-1, 2, 10)

    def training_step(self, batch, batch_idx):
        return self(batch[0]).float().mean()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("sanity_steps", [0, 2], ids=["at_first_train_batch", "at_sanity_check"])
def test_output_not_logits_names_the_shape_before_training(tmp_path: Path, sanity_steps: int) -> None:
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=str(tmp_path), num_sanity_val_steps=sanity_steps,
                        callbacks=[ToleranceAudit()], **FAST)
    split = "training" if sanity_steps == 0 else "validation"
    with pytest.raises(ValueError, match=rf"_BadOutput returned a float32 tensor of shape \(2, 2, 10\) for the "
                       rf"{split} batch's input.*\(N, C\) classification logits with C >= 2.*Lemma-1"):
        trainer.fit(_BadOutput(), datamodule=DigitsDataModule(batch_size=64))
    assert trainer.global_step == 0


@pytest.mark.parametrize("out", [torch.zeros(4), torch.zeros(4, 1), torch.zeros(4, 3, dtype=torch.int64),
                                 (torch.zeros(4, 3),)], ids=["N", "N1", "int", "tuple"])
def test_check_logits_demands_two_or_more_float_classes(out) -> None:
    with pytest.raises(ValueError, match=r"C >= 2 from Net, got an? .*; the Lemma-1 audit certifies classification"):
        check_logits(out, "Net")
    assert check_logits(torch.zeros(4, 2), "Net").shape == (4, 2)


DDP_BODY = """
import json, sys
from pathlib import Path
from lp_lightning.audit.tolerance import summarize
from lp_lightning.callbacks import ToleranceAudit

if __name__ == "__main__":
    root = Path(sys.argv[0]).parent
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64)
    model = Classifier(net="mlp", input_shape=list(dm.input_shape), num_classes=dm.num_classes)
    trainer = ddp_trainer(root, max_epochs=1, limit_train_batches=3, enable_checkpointing=False,
                          callbacks=[ToleranceAudit(reference="float64")])
    trainer.fit(model, datamodule=dm)
    if trainer.is_global_zero:  # oracle: the same weights audited in one process over the whole val set
        model = model.cpu().eval()
        x = torch.stack([x for x, _ in dm.dataset("val")])
        with torch.no_grad():
            expected = summarize(model(x), model.double()(x.double()))
        (root / "expected.json").write_text(json.dumps(expected))
        (root / "callback_metric.txt").write_text(str(float(trainer.callback_metrics["audit/agreement"])))
"""


def test_ddp_covers_all_ranks_and_writes_once(tmp_path: Path) -> None:
    run_ddp_script(DDP_BODY, tmp_path)
    files = sorted(p.name for p in (tmp_path / "audit").iterdir())
    assert files == ["epoch_000.json", "epoch_000.png"]
    report = json.loads((tmp_path / "audit" / "epoch_000.json").read_text())
    expected = json.loads((tmp_path / "expected.json").read_text())
    assert report["n_samples"] == expected["n_samples"] == 270  # both ranks' shards, padding removed
    for key in ("violations", "nonfinite", "agreement"):
        assert report[key] == expected[key], key
    assert report["certified_fraction"] == pytest.approx(expected["certified_fraction"], abs=1.5 / 270)
    for key in ("tol_mean", "tol_median"):  # fp32 batches of 64 per rank vs one batch: ulp-level differences
        assert report[key] == pytest.approx(expected[key], rel=1e-5), key
    for key in ("err_mean", "err_p99", "err_max"):
        assert report[key] == pytest.approx(expected[key], abs=1e-6), key
    assert float((tmp_path / "callback_metric.txt").read_text()) == pytest.approx(report["agreement"])


def test_callbacks_audit_config_instantiates() -> None:
    from lp_lightning.config import build_callbacks
    from tests.conftest import compose_train

    cfg = compose_train(["callbacks=audit", "callbacks.audit.reference=float64", "callbacks.audit.max_samples=50"])
    guard, audit = build_callbacks(cfg.callbacks)  # the audit config keeps the default epsilon guard
    assert isinstance(guard, EpsilonGuard) and guard.action == "raise"
    assert isinstance(audit, ToleranceAudit)
    assert (audit.reference_dtype, audit.every_n_epochs, audit.max_samples, audit.plot) == (torch.float64, 1, 50, True)
