"""Shared fixtures: tiny trained checkpoints and Hydra composition helpers."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
from omegaconf import DictConfig

from lp_lightning.config import compose_config
from lp_lightning.data import DigitsDataModule
from lp_lightning.models import Classifier

os.environ.setdefault("PYTHONWARNINGS", "ignore")


def compose_train(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/train.yaml`` with ``overrides`` (no Hydra run dir, no side effects)."""
    return compose_config("train", overrides)


def fit_classifier(root: Path, net: str = "mlp", epochs: int = 3, plugins: list | None = None,
                   optimizer: dict | None = None, callbacks: list | None = None, seed: int = 0,
                   **trainer_kwargs) -> tuple[Classifier, L.Trainer, Path]:
    """Train a small Classifier on digits; return it, its trainer and the last checkpoint path."""
    L.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(batch_size=64)
    model = Classifier(net=net, input_shape=list(dm.input_shape), num_classes=dm.num_classes,
                       optimizer=optimizer or {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                       data={"name": "digits", "batch_size": 64})
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=str(root),
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        plugins=plugins or [], callbacks=callbacks or [], **trainer_kwargs)
    trainer.fit(model, datamodule=dm)
    ckpt = root / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    return model, trainer, ckpt


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory ``net -> path`` of an fp32 checkpoint trained briefly on digits (cached per net)."""
    cache: dict[str, Path] = {}

    def make(net: str = "mlp") -> Path:
        if net not in cache:
            epochs = {"mlp": 5, "cnn": 4, "vit": 8}[net]
            opt = {"name": "adamw", "lr": 3e-3} if net == "vit" else None
            _, _, cache[net] = fit_classifier(tmp_path_factory.mktemp(f"ckpt_{net}"), net=net, epochs=epochs,
                                              optimizer=opt)
        return cache[net]

    return make
