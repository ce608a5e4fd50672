"""Nets adapt to input shapes and train; checkpoints reload safely with identical predictions."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lp_lightning.data import DigitsDataModule
from lp_lightning.data.rebuild import datamodule_from_hparams
from lp_lightning.models import CheckpointError, Classifier, load_classifier, read_checkpoint
from lp_lightning.models.optim import OPTIMIZERS, build_optimizer, build_scheduler
from tests.conftest import fit_classifier


@pytest.mark.parametrize("net", ["mlp", "cnn", "vit"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_nets_adapt_to_input_shape(net: str, shape: tuple[int, ...]) -> None:
    model = Classifier(net=net, input_shape=list(shape), num_classes=7)
    assert model(torch.randn(3, *shape)).shape == (3, 7)
    assert model.net.classifier.out_features == 7


@pytest.mark.parametrize("net", ["mlp", "cnn", "vit"])
def test_each_net_learns_a_few_steps(net: str) -> None:
    torch.manual_seed(0)
    model = Classifier(net=net, optimizer={"name": "adam", "lr": 3e-3})
    from lp_lightning.data import DigitsDataModule

    x, y = DigitsDataModule().dataset("train").tensors
    x, y = x[:128], y[:128]
    opt = model.configure_optimizers()
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_builds_with_its_eps(name: str) -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    kwargs = {"name": name, "lr": 0.01}
    if name != "sgd":
        kwargs["eps"] = 1e-4
    opt = build_optimizer(params, kwargs)
    assert opt.param_groups[0]["lr"] == 0.01
    if name != "sgd":
        assert opt.param_groups[0]["eps"] == 1e-4


def test_bad_optimizer_and_net_names_list_allowed() -> None:
    with pytest.raises(ValueError, match=r"optimizer.name='lion'.*adam"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], {"name": "lion"})
    with pytest.raises(ValueError, match=r"net='resnet'.*cnn.*mlp.*vit"):
        Classifier(net="resnet")


def test_checkpoint_reloads_with_same_predictions(tmp_path: Path) -> None:
    model, _, ckpt = fit_classifier(tmp_path, net="cnn", epochs=1)
    raw = torch.load(ckpt, weights_only=True)  # hyperparameters are plain values
    assert raw["hyper_parameters"]["net"] == "cnn" and raw["hyper_parameters"]["data"]["name"] == "digits"
    x = torch.randn(16, 1, 8, 8)
    reloaded = Classifier.load_from_checkpoint(ckpt, weights_only=True)
    safe, _ = load_classifier(ckpt)
    expected = model.predict_logits(x)
    torch.testing.assert_close(reloaded.predict_logits(x), expected)
    torch.testing.assert_close(safe.predict_logits(x), expected)


def test_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing.ckpt.*does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="is a directory"):
        read_checkpoint(tmp_path)
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    with pytest.raises(CheckpointError, match="empty.ckpt.*empty"):
        read_checkpoint(empty)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt.ckpt"):
        read_checkpoint(corrupt)
    nohp = tmp_path / "nohp.ckpt"
    torch.save({"state_dict": {}}, nohp)  # readable (a user's module may save no hyperparameters) ...
    assert read_checkpoint(nohp) == {"state_dict": {}}
    with pytest.raises(CheckpointError, match="nohp.ckpt.*no saved hyperparameters.*model_class="):
        load_classifier(nohp)  # ... but not an lp-train checkpoint


def test_checkpoint_with_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"net": "mlp"}, "x": Evil()}, bad)
    with pytest.raises(CheckpointError, match="evil.ckpt.*refused"):
        read_checkpoint(bad)
    assert not marker.exists()


def test_weights_that_do_not_fit_name_the_file_and_mismatch_on_one_line(tmp_path: Path) -> None:
    model = Classifier(net="mlp", input_shape=[1, 8, 8], num_classes=10, data={"name": "digits"})
    hparams = {**dict(model.hparams), "num_classes": 3}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, tmp_path / "nc.ckpt")
    with pytest.raises(CheckpointError) as info:
        load_classifier(tmp_path / "nc.ckpt")
    message = str(info.value)
    assert "nc.ckpt" in message and "size mismatch for net.classifier" in message and "\n" not in message


@pytest.mark.parametrize(("data", "match"), [("digits", "is not a mapping"),
                                             ({"name": "imagenet"}, "data='imagenet' is unknown"),
                                             ({"name": "digits", "bogus": 1}, "bogus")])
def test_data_settings_that_build_nothing_name_the_checkpoint(data: object, match: str) -> None:
    with pytest.raises(CheckpointError, match=rf"checkpoint 'run/x.ckpt'.*{match}"):
        datamodule_from_hparams({"data": data}, "run/x.ckpt")


class _EpochLR(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _cosine_lrs(root: Path, ckpt: str | None = None, **trainer_kwargs) -> tuple[list[float], Path]:
    torch.manual_seed(0)
    model = Classifier(net="mlp", input_shape=[1, 8, 8], num_classes=10, scheduler={"name": "cosine"},
                       optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9}, data={"name": "digits"})
    lrs = _EpochLR()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, limit_train_batches=2, callbacks=[lrs],
                        default_root_dir=str(root), **trainer_kwargs)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64), ckpt_path=ckpt, weights_only=True)
    trainer.save_checkpoint(root / "end.ckpt")
    return lrs.lrs, root / "end.ckpt"


def test_a_resume_with_more_epochs_continues_the_cosine_schedule(tmp_path: Path) -> None:
    fresh, _ = _cosine_lrs(tmp_path / "fresh", max_epochs=4)
    first, ckpt = _cosine_lrs(tmp_path / "first", max_epochs=2)
    resumed, _ = _cosine_lrs(tmp_path / "resumed", ckpt=str(ckpt), max_epochs=4)
    assert first == pytest.approx([0.05, 0.025])  # its own 2-epoch cosine
    assert resumed == pytest.approx(fresh[2:])  # continues as a 4-epoch run would, not a restart at lr 0
    assert fresh == pytest.approx([0.05 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])


def test_a_step_budget_spreads_the_cosine_over_the_steps(tmp_path: Path) -> None:
    lrs, _ = _cosine_lrs(tmp_path, max_epochs=-1, max_steps=8)  # 4 epochs of 2 steps
    assert len(lrs) == 4 and all(a > b > 0 for a, b in zip(lrs, lrs[1:], strict=False))  # one period
    assert lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * s / 8)) / 2 for s in (0, 2, 4, 6)])


def test_optimizer_and_scheduler_errors_name_the_config_keys() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=r"optimizer 'sgd' rejects optimizer.lr=-1.*Invalid learning rate"):
        build_optimizer(params, {"name": "sgd", "lr": -1})
    optimizer = build_optimizer(params, {"name": "sgd", "lr": 0.1})
    with pytest.raises(ValueError, match=r"model.scheduler \{'name': 'step'\}: .*step_size"):
        build_scheduler(optimizer, {"name": "step"}, 10)
    with pytest.raises(ValueError, match=r"model.scheduler.T_max is set from the run's length"):
        build_scheduler(optimizer, {"name": "cosine", "T_max": 5}, 10)
