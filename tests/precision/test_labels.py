"""Titles say what they show: lp-train's precision names (int8, int4w, fp16, ...) and the model's net, also on
ToleranceAudit's plots."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.plugins import MixedPrecision, Precision

from lp_lightning.callbacks import ToleranceAudit
from lp_lightning.precision import FakeQuantPrecision, PureHalfPrecision
from lp_lightning.precision.labels import model_label, precision_label
from tests.conftest import fit_classifier


@pytest.mark.parametrize(("plugin", "label"), [
    (Precision(), "fp32"), (PureHalfPrecision("float16"), "fp16"), (PureHalfPrecision("bfloat16"), "bf16"),
    (MixedPrecision("bf16-mixed", device="cpu"), "bf16_mixed"), (FakeQuantPrecision(), "int8"),
    (FakeQuantPrecision(weight="int4", granularity="per_group", group_size=32), "int4w"),
], ids=["fp32", "fp16", "bf16", "bf16_mixed", "int8", "int4w"])
def test_precision_label_is_the_config_name(plugin: Precision, label: str) -> None:
    assert precision_label(plugin) == label


def test_model_label_is_the_net_or_the_class() -> None:
    assert model_label(Precision()) == "Precision"  # no hparams: the class name


def test_tolerance_audit_plot_title_names_model_precision_and_epoch(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    titles: list[str] = []
    monkeypatch.setattr(ToleranceAudit, "_render", lambda self, comparison, path, title: titles.append(title))
    model, _, _ = fit_classifier(tmp_path, net="mlp", epochs=1, plugins=[FakeQuantPrecision()],
                                 callbacks=[ToleranceAudit(max_samples=32)], limit_train_batches=2,
                                 limit_val_batches=1)
    assert model_label(model) == "mlp"
    assert titles == ["mlp int8, epoch 0: vs float32"]
