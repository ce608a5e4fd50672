"""lp-train init_from=: QAT fine-tuning from a trained checkpoint's weights (new optimizer, scaled lr, fewer epochs)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lp_lightning import load_weights
from lp_lightning.models import CheckpointError
from lp_lightning.quant import fake_quant_layers
from lp_lightning.train import run
from tests.conftest import compose_train

QUICK = ["model=mlp", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "+trainer.limit_train_batches=4"]
SEEN: dict[str, object] = {}


class InitSpy(L.Callback):
    """Records the weights, optimizer and epoch a fit starts from."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        SEEN["state"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if "act_observer" not in k
                         and not k.endswith(("weight_scale", "weight_zero_point"))}
        SEEN["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        SEEN["opt_state"] = len(trainer.optimizers[0].state)
        SEEN["epoch"] = trainer.current_epoch
        SEEN["fake_quant"] = len(fake_quant_layers(pl_module))


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fp32")
    run(compose_train(QUICK), root)
    return root / "checkpoints" / "best.ckpt"


def test_init_from_starts_qat_from_the_weights_with_a_new_optimizer(fp32_run: Path, tmp_path: Path) -> None:
    cfg = compose_train([*QUICK, "precision=int8", f"init_from={fp32_run}", "finetune.max_epochs=1",
                         "+callbacks.spy._target_=tests.test_train_finetune.InitSpy"])
    metrics = run(cfg, tmp_path, precision_name="int8")
    saved = torch.load(fp32_run, weights_only=True)
    assert SEEN["state"].keys() == saved["state_dict"].keys()
    assert all(torch.equal(SEEN["state"][k], v) for k, v in saved["state_dict"].items())  # the fp32 weights
    assert SEEN["fake_quant"] > 0 and SEEN["epoch"] == 0 and SEEN["opt_state"] == 0  # QAT, fresh optimizer
    assert SEEN["lr"] == pytest.approx(0.05 * 0.1)  # the sgd group's lr times finetune.lr_scale
    fp32 = json.loads((fp32_run.parent.parent / "metrics.json").read_text())["test_acc"]
    assert metrics["epochs"] == 1 and metrics["test_acc"] >= fp32 - 0.1  # QAT kept what fp32 learned
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optimizer"]["lr"] == pytest.approx(0.005)


@pytest.mark.parametrize(("overrides", "match"), [
    (["resume={ckpt}"], "give one of them"),
    (["model=cnn"], r"init_from checkpoint '.*best.ckpt' does not fit lp_lightning.models.classifier.Classifier"),
    (["finetune.lr_scale=-1"], r"finetune.lr_scale=-1 must be null or a positive number"),
])
def test_bad_init_from_is_one_line_before_training(fp32_run: Path, tmp_path: Path, overrides: list[str],
                                                   match: str) -> None:
    cfg = compose_train([*QUICK, f"init_from={fp32_run}", *(o.format(ckpt=fp32_run) for o in overrides)])
    with pytest.raises((ValueError, CheckpointError), match=match) as info:
        run(cfg, tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "checkpoints").exists()


def test_load_weights_on_a_users_module(tmp_path: Path) -> None:
    from tests.user_pkg.models import TinyResNet

    trained = TinyResNet(width=4)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "w.ckpt")
    fresh = load_weights(TinyResNet(width=4), tmp_path / "w.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values(),
                                                 strict=True))
    with pytest.raises(CheckpointError, match="does not fit tests.user_pkg.models.TinyResNet"):
        load_weights(TinyResNet(width=8), tmp_path / "w.ckpt")
