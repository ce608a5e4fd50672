"""``lp-train``: compose the config, instantiate data, model, precision and trainer; fit; test."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from lp_lightning.config import build_callbacks, config_dir, data_spec, precision_kwargs, validate
from lp_lightning.io import atomic_write, write_json
from lp_lightning.models import read_checkpoint


def run(cfg: DictConfig, run_dir: str | Path, precision_name: str = "custom") -> dict[str, Any]:
    """Train and test one configuration; write checkpoints, ``config.yaml`` and ``metrics.json``."""
    validate(cfg)
    run_dir = Path(run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    model = instantiate(cfg.model, input_shape=list(datamodule.input_shape), num_classes=datamodule.num_classes,
                        optimizer=optimizer, data=data_spec(datamodule, cfg.data), _convert_="all")
    trainer_kwargs, plugins = precision_kwargs(cfg.precision)
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/acc",
                                 mode="max", save_last=True)
    timer = Timer()
    trainer = instantiate(cfg.trainer, **trainer_kwargs, plugins=plugins, default_root_dir=str(run_dir),
                          logger=CSVLogger(str(run_dir), name="logs"),
                          callbacks=[checkpoint, timer, *build_callbacks(cfg.get("callbacks"))])
    resume = cfg.get("resume")
    if resume:
        read_checkpoint(resume)  # one-line error for a missing, corrupt or foreign file, before training
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)
    # before validate/test restore the callback's state from best.ckpt (saved before last.ckpt existed)
    best_path, last_path = checkpoint.best_model_path, checkpoint.last_model_path
    val = trainer.validate(model, datamodule=datamodule, ckpt_path="best", verbose=False)[0]
    test = trainer.test(model, datamodule=datamodule, ckpt_path="best", verbose=False)[0]
    epochs = max(1, trainer.current_epoch)
    metrics = {
        "precision": precision_name,
        "model": model.hparams.net,
        "data": model.hparams.data["name"],
        "seed": cfg.seed,
        "epochs": epochs,
        "val_acc": val["val/acc"], "val_loss": val["val/loss"],
        "test_acc": test["test/acc"], "test_loss": test["test/loss"],
        "wall_time_s": time.perf_counter() - start,
        "time_per_epoch_s": timer.time_elapsed("train") / epochs,
        "best_checkpoint": best_path,
        "last_checkpoint": last_path,
    }
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
        config_text = OmegaConf.to_yaml(cfg, resolve=True)
        atomic_write(run_dir / "config.yaml", lambda tmp: tmp.write_text(config_text))
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float:
    """Entry point of ``lp-train``; returns the test accuracy (useful for sweeps). Bad input: exit 2."""
    hydra_cfg = HydraConfig.get()
    try:
        metrics = run(cfg, hydra_cfg.runtime.output_dir, hydra_cfg.runtime.choices.get("precision", "custom"))
    except ValueError as exc:  # invalid values, unusable checkpoint (CheckpointError), unsafe eps (EpsilonGuard)
        print(f"lp-train: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"test_acc={metrics['test_acc']:.4f} val_acc={metrics['val_acc']:.4f} "
          f"time_per_epoch={metrics['time_per_epoch_s']:.2f}s -> {hydra_cfg.runtime.output_dir}/metrics.json")
    return metrics["test_acc"]


if __name__ == "__main__":
    main()
