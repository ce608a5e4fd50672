"""FakeQuantPrecision in a Trainer (issue 17): BatchNorm recalibration attached and applied, per-layer range
statistics logged, fail-fast warnings naming the layer (eval mode, unobserved observer, unquantizable layer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from lp_lightning.callbacks import BatchNormRecalibration
from lp_lightning.precision import FakeQuantPrecision
from lp_lightning.quant import convert
from lp_lightning.quant.batchnorm import recalibrate_batchnorm
from tests.user_pkg.data import DigitsRows
from tests.user_pkg.models import DepthwiseSeparableCNN, TinyResNet


def _fit(model: L.LightningModule, plugin: FakeQuantPrecision, root: Path, **kwargs: Any) -> L.Trainer:
    settings: dict[str, Any] = dict(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                                    default_root_dir=str(root), limit_train_batches=6, limit_val_batches=1,
                                    num_sanity_val_steps=0)
    settings.update(kwargs)
    trainer = L.Trainer(plugins=[plugin], **settings)
    trainer.fit(model, datamodule=DigitsRows(layout="triple"))
    return trainer


def _bn_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def test_batchnorm_statistics_are_recalibrated_on_the_final_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyResNet(width=8, blocks=1)
    trainer = _fit(model, FakeQuantPrecision(bn_recalibration=4), tmp_path)
    attached = [cb for cb in trainer.callbacks if isinstance(cb, BatchNormRecalibration)]
    assert len(attached) == 1 and trainer.callbacks[0] is attached[0]  # before the checkpoint callbacks
    after_fit = _bn_state(model)
    dm = DigitsRows(layout="triple")
    dm.setup()
    loader = torch.utils.data.DataLoader(dm.sets["train"], batch_size=64)
    recalibrate_batchnorm(model, loader, 4, forward=lambda batch: model(batch[0]))
    for key, value in _bn_state(model).items():  # already the statistics of the final weights and ranges
        assert torch.allclose(after_fit[key], value, rtol=1e-5, atol=1e-6), key


def test_bn_recalibration_none_warns_and_attaches_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"bn_recalibration=None.*'stem.1'"):
        trainer = _fit(TinyResNet(width=8, blocks=1), FakeQuantPrecision(bn_recalibration=None), tmp_path,
                       limit_train_batches=1)
    assert not any(isinstance(cb, BatchNormRecalibration) for cb in trainer.callbacks)


def test_clipped_fraction_and_range_growth_are_logged_per_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DepthwiseSeparableCNN(width=8)
    trainer = _fit(model, FakeQuantPrecision(), tmp_path, log_every_n_steps=2)
    keys = set(trainer.callback_metrics)
    for layer in ("conv", "dw", "pw", "seq", "fc"):
        assert f"fake_quant/clipped/{layer}" in keys and f"fake_quant/range_growth/{layer}" in keys
    assert 0.0 <= float(trainer.callback_metrics["fake_quant/clipped/dw"]) <= 1.0


def test_eval_mode_at_the_first_training_step_is_named(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyResNet(width=8, blocks=1).eval()  # Lightning 2.6 keeps it in eval mode during fit
    with pytest.warns(UserWarning, match=r"\['stem.0', 'stem.1', .*'fc'\] are in eval mode at the first training"):
        _fit(model, FakeQuantPrecision(), tmp_path, limit_train_batches=1)


class _Unused(TinyResNet):
    def __init__(self) -> None:
        super().__init__(width=8, blocks=1)
        self.spare = nn.Linear(4, 4)  # never called by forward


class _MyLinear(nn.Linear):
    pass


class _Subclassed(TinyResNet):
    def __init__(self) -> None:
        super().__init__(width=8, blocks=1)
        self.fc = _MyLinear(8 * 16, 10)


def test_an_observer_without_data_after_the_first_step_is_named(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"observers of \['spare'\] saw no data in the first training step"):
        _fit(_Unused(), FakeQuantPrecision(), tmp_path, limit_train_batches=1)


def test_a_layer_that_cannot_be_swapped_is_named() -> None:
    with pytest.warns(UserWarning, match=r"'fc': _MyLinear subclasses Linear"):
        FakeQuantPrecision().convert_module(_Subclassed())
    FakeQuantPrecision(skip=["fc"]).convert_module(_Subclassed())  # skipped explicitly: no warning


def test_converted_model_agrees_with_the_qat_model_after_fit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DepthwiseSeparableCNN(width=8)
    _fit(model, FakeQuantPrecision(), tmp_path)
    x = torch.rand(128, 1, 8, 8)
    converted, _ = convert(model.eval())
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), model(x))
