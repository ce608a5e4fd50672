"""FakeQuantPrecision checkpoints reload in plain Lightning: fresh model + fresh plugin, ckpt_path, LightningCLI.

The checkpoint's ``state_dict`` is the plain model's; the fake-quant buffers are in
``checkpoint["FakeQuantPrecision"]["module_state"]``. Uses a user's own modules (tests/user_pkg).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn

from lp_lightning.precision import FakeQuantPrecision
from lp_lightning.quant import dequantize, fake_quant_layers, quant_state_dict
from tests.ddp import run_ddp_script
from tests.user_pkg.data import DigitsRows
from tests.user_pkg.models import RowTransformer, TinyResNet

KEY = "FakeQuantPrecision"


def _trainer(root: Path, plugin: FakeQuantPrecision, epochs: int = 1, **kwargs: Any) -> L.Trainer:
    settings: dict[str, Any] = dict(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                                    enable_progress_bar=False, enable_model_summary=False,
                                    enable_checkpointing=False, default_root_dir=str(root),
                                    limit_train_batches=4, limit_val_batches=1, limit_test_batches=2)
    settings.update(kwargs)
    return L.Trainer(plugins=[plugin], **settings)


def _transformer() -> RowTransformer:
    torch.manual_seed(0)
    return RowTransformer()


def _resnet() -> TinyResNet:
    torch.manual_seed(0)
    return TinyResNet(width=8, blocks=1)


def _quant_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in quant_state_dict(model).items()}


def _assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class _AtTrainStart(Callback):
    """Record the restored fake-quant state and step count when training (re)starts."""

    def __init__(self, plugin: FakeQuantPrecision) -> None:
        self.plugin = plugin
        self.state: dict[str, Tensor] = {}
        self.steps = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state, self.steps = _quant_state(pl_module), self.plugin.steps


def test_quant_state_dict_is_what_the_plain_module_lacks() -> None:
    for model in (_transformer(), _resnet()):
        FakeQuantPrecision().convert_module(model)
        extra = set(model.state_dict()) - set(dequantize(model).state_dict())
        assert set(quant_state_dict(model)) == extra and extra


def test_checkpoint_layout_and_a_fresh_fit_resumes(tmp_path: Path) -> None:
    dm = DigitsRows(layout="dict")
    model, plugin = _transformer(), FakeQuantPrecision(freeze_observers_after=6)
    trainer = _trainer(tmp_path, plugin)
    trainer.fit(model, datamodule=dm)
    saved = _quant_state(model)
    trainer.save_checkpoint(tmp_path / "e1.ckpt")

    ckpt = torch.load(tmp_path / "e1.ckpt", weights_only=True)
    assert set(ckpt[KEY]) == {"config", "steps", "converted_layers", "module_state"}
    assert ckpt[KEY]["steps"] == 4 and ckpt[KEY]["module_state"].keys() == saved.keys()
    plain = RowTransformer()
    plain.load_state_dict(ckpt["state_dict"], strict=True)  # the plain module's keys exactly
    assert torch.equal(plain.embed.weight, model.embed.weight)
    assert not fake_quant_layers(RowTransformer.load_from_checkpoint(tmp_path / "e1.ckpt"))  # float weights

    fresh, second = _transformer(), FakeQuantPrecision(freeze_observers_after=6)
    seen = _AtTrainStart(second)
    resumed = _trainer(tmp_path, second, epochs=2, callbacks=[seen])
    resumed.fit(fresh, datamodule=dm, ckpt_path=tmp_path / "e1.ckpt")
    assert seen.steps == 4
    _assert_same(seen.state, saved)
    assert second.steps == resumed.global_step == 8
    assert all(obs.is_frozen for obs in second._observers)  # frozen at step 6 of the resumed run
    assert not torch.equal(fresh.embed.weight, model.embed.weight)  # training went on


def test_fresh_test_gives_the_saved_models_metric(tmp_path: Path) -> None:
    dm = DigitsRows(layout="triple")
    model, plugin = _resnet(), FakeQuantPrecision(weight="int4")
    trainer = _trainer(tmp_path, plugin)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    expected = trainer.test(model, datamodule=dm, verbose=False)[0]["test_loss"]

    fresh = _resnet()
    got = _trainer(tmp_path, FakeQuantPrecision(weight="int4")).test(fresh, datamodule=dm, verbose=False,
                                                                     ckpt_path=tmp_path / "model.ckpt")
    assert got[0]["test_loss"] == expected
    _assert_same(_quant_state(fresh), _quant_state(model))


def test_same_trainer_fit_then_test_from_a_checkpoint(tmp_path: Path) -> None:
    dm = DigitsRows(layout="dict")
    model, plugin = _transformer(), FakeQuantPrecision()
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    trainer = _trainer(tmp_path, plugin, epochs=2, enable_checkpointing=True, callbacks=[saver])
    trainer.fit(model, datamodule=dm)
    first = tmp_path / "epoch=0.ckpt"
    assert trainer.test(model, datamodule=dm, ckpt_path="best", verbose=False)
    trainer.test(model, datamodule=dm, ckpt_path=first, verbose=False)
    ckpt = torch.load(first, weights_only=True)
    _assert_same(_quant_state(model), ckpt[KEY]["module_state"])  # the checkpoint's ranges, not the latest
    assert plugin.steps == 4 and torch.equal(model.embed.weight, ckpt["state_dict"]["embed.weight"])


def test_old_format_checkpoint_resumes_via_restore_module(tmp_path: Path) -> None:
    dm = DigitsRows(layout="triple")
    model, plugin = _resnet(), FakeQuantPrecision()
    trainer = _trainer(tmp_path, plugin)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    ckpt = torch.load(tmp_path / "new.ckpt", weights_only=True)
    ckpt["state_dict"].update(ckpt[KEY].pop("module_state"))  # as earlier versions wrote it
    torch.save(ckpt, tmp_path / "old.ckpt")

    fresh, second = _resnet(), FakeQuantPrecision()
    FakeQuantPrecision.restore_module(fresh, ckpt[KEY])
    seen = _AtTrainStart(second)
    _trainer(tmp_path, second, epochs=2, callbacks=[seen]).fit(fresh, datamodule=dm, ckpt_path=tmp_path / "old.ckpt")
    _assert_same(seen.state, _quant_state(model))
    assert seen.steps == 4 and second.steps == 8


def _converted_with_observed_ranges(plugin: FakeQuantPrecision) -> RowTransformer:
    model = _transformer()
    plugin.convert_module(model)
    with plugin.forward_context():
        model.train()(torch.randn(4, 8, 8))
    return model


def test_load_state_dict_freezes_a_run_past_the_freeze_point() -> None:
    saver = FakeQuantPrecision()
    source = _converted_with_observed_ranges(saver)
    checkpoint: dict[str, Any] = {"state_dict": source.state_dict()}
    saver.steps = 5
    saver.on_save_checkpoint(checkpoint)
    assert not (set(checkpoint["state_dict"]) & set(checkpoint[KEY]["module_state"]))

    target, plugin = _transformer(), FakeQuantPrecision(freeze_observers_after=3)
    plugin.convert_module(target)
    with pytest.warns(UserWarning, match="trained with"):  # another freeze_observers_after
        plugin.load_state_dict(checkpoint[KEY])
    assert plugin.steps == 5 and all(obs.is_frozen and obs.initialized for obs in plugin._observers)
    state = _quant_state(target)
    for key, value in checkpoint[KEY]["module_state"].items():
        assert key.endswith(".frozen") or torch.equal(state[key], value), key


def test_module_state_loaded_before_convert_module_is_applied_by_it() -> None:
    saver = FakeQuantPrecision()
    source = _converted_with_observed_ranges(saver)
    checkpoint: dict[str, Any] = {"state_dict": source.state_dict(), KEY: saver.state_dict()}
    saver.on_save_checkpoint(checkpoint)
    plugin, target = FakeQuantPrecision(), _transformer()
    plugin.load_state_dict(checkpoint[KEY])
    plugin.convert_module(target)
    _assert_same(_quant_state(target), checkpoint[KEY]["module_state"])
    assert all(obs.initialized for obs in plugin._observers)


def test_module_state_that_does_not_fit_names_the_layer() -> None:
    model, plugin = _transformer(), FakeQuantPrecision()
    plugin.convert_module(model)
    state = _quant_state(model)
    del state["head.weight_scale"]
    with pytest.raises(ValueError, match=r"FakeQuantPrecision: .*\['head'\] have no saved qparams"):
        plugin.load_state_dict({"steps": 1, "module_state": state})
    state = _quant_state(model) | {"decoder.act_observer.scale": torch.tensor(1.0)}
    with pytest.raises(ValueError, match=r"saved qparams of \['decoder'\] have no fake-quant layer"):
        plugin.load_state_dict({"steps": 1, "module_state": state})
    state = _quant_state(model) | {"head.weight_scale": torch.ones(3)}
    with pytest.raises(ValueError, match=r"layer 'head' do not fit: .*size mismatch"):
        plugin.load_state_dict({"steps": 1, "module_state": state})


def test_converted_module_loads_a_plain_state_dict_once_hooked() -> None:
    model = _converted_with_observed_ranges(FakeQuantPrecision())
    FakeQuantPrecision().convert_module(model)  # a second plugin: still one hook
    assert len(model._load_state_dict_pre_hooks) == 1
    before = _quant_state(model)
    model.load_state_dict(RowTransformer().state_dict(), strict=True)
    _assert_same(_quant_state(model), before)


def test_save_weights_only_keeps_the_buffers_in_the_state_dict_and_warns(tmp_path: Path) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True, filename="w")
    trainer = _trainer(tmp_path, FakeQuantPrecision(), enable_checkpointing=True, callbacks=[saver])
    model = _resnet()
    with pytest.warns(UserWarning, match="save_weights_only=True"):
        trainer.fit(model, datamodule=DigitsRows(layout="triple"))
    ckpt = torch.load(tmp_path / "w.ckpt", weights_only=True)
    assert KEY not in ckpt and set(quant_state_dict(model)) <= set(ckpt["state_dict"])


def _cli(command: str, root: Path, *extra: str) -> LightningCLI:
    plugin = {"class_path": "lp_lightning.precision.FakeQuantPrecision", "init_args": {"weight": "int4"}}
    args = [command, "--trainer.plugins", json.dumps(plugin), "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={root}", "--data.layout=triple",
            "--model.width=8", "--model.blocks=1", *extra]
    return LightningCLI(TinyResNet, DigitsRows, args=args, save_config_callback=None)


def test_lightning_cli_fit_then_test_with_ckpt_path(tmp_path: Path) -> None:
    fit = _cli("fit", tmp_path)
    path = fit.trainer.checkpoint_callback.best_model_path
    assert path and fit.trainer.precision_plugin.num_converted == 4
    expected = fit.trainer.test(fit.model, datamodule=fit.datamodule, verbose=False)[0]["test_loss"]
    test = _cli("test", tmp_path, "--ckpt_path", path)
    assert isinstance(test.trainer.precision_plugin, FakeQuantPrecision)
    assert float(test.trainer.callback_metrics["test_loss"]) == expected


DDP_RESUME = """
import json
from lp_lightning.precision import FakeQuantPrecision
from lp_lightning.quant import quant_state_dict
from tests.user_pkg.data import DigitsRows
from tests.user_pkg.models import TinyResNet

def state(model):
    return {k: v.tolist() for k, v in quant_state_dict(model).items()}

if __name__ == "__main__":
    torch.manual_seed(0)
    model, plugin = TinyResNet(width=8, blocks=1), FakeQuantPrecision(freeze_observers_after=6)
    trainer = ddp_trainer(".", plugins=[plugin], limit_train_batches=4, limit_val_batches=1)
    trainer.fit(model, datamodule=DigitsRows(layout="triple", batch_size=32))
    trainer.save_checkpoint("ddp.ckpt")  # written by rank 0 only
    saved = state(model)
    torch.manual_seed(1)
    fresh, second = TinyResNet(width=8, blocks=1), FakeQuantPrecision(freeze_observers_after=6)
    trainer = ddp_trainer(".", plugins=[second], limit_train_batches=4, limit_val_batches=1)
    trainer.fit(fresh, datamodule=DigitsRows(layout="triple", batch_size=32), ckpt_path="ddp.ckpt")
    with open(f"rank_{trainer.global_rank}.json", "w") as f:
        json.dump({"saved": saved, "restored": state(fresh), "steps": second.steps}, f)
"""


@pytest.mark.slow  # two DDP processes in fresh interpreters: ~30-60 s on a busy 2-core machine
def test_ddp_rank_zero_saves_and_every_rank_restores(tmp_path: Path) -> None:
    (tmp_path / "tests").symlink_to(Path(__file__).parents[1])
    run_ddp_script(DDP_RESUME, tmp_path)
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["saved"] == ranks[1]["saved"] == ranks[0]["restored"] == ranks[1]["restored"]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
