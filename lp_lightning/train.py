"""``lp-train``: compose the config, instantiate data, model, precision and trainer; fit; test."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from lp_lightning.cli import bad_config_exits_2, one_line
from lp_lightning.config import build_callbacks, config_dir, data_spec, precision_kwargs, validate
from lp_lightning.io import atomic_write, write_json
from lp_lightning.logs import share_file_handlers
from lp_lightning.models import CheckpointError, read_checkpoint
from lp_lightning.models.checkpoint import STRUCTURAL_PLUGINS, structural_config


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
    # best.ckpt by val/acc; last.ckpt after every epoch (Lightning's save_last only follows the best's saves)
    best = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/acc", mode="max",
                           enable_version_counter=False)  # a rerun into the same run dir replaces best.ckpt
    last = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", enable_version_counter=False,
                           save_on_train_epoch_end=True)  # also when validation runs less often than every epoch
    timer = Timer()
    trainer = instantiate(cfg.trainer, **trainer_kwargs, plugins=plugins, default_root_dir=str(run_dir),
                          logger=CSVLogger(str(run_dir), name="logs"),
                          callbacks=[best, last, timer, *build_callbacks(cfg.get("callbacks"))])
    resume = cfg.get("resume")
    if resume:  # one-line errors for a missing, corrupt, foreign or other-model file, before training
        check_resumable(read_checkpoint(resume), model, str(resume), plugins, trainer.max_epochs)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)
    # before validate/test restore the callbacks' state (paths, elapsed time) from best.ckpt
    best_path, last_path, train_s = best.best_model_path, last.best_model_path, timer.time_elapsed("train")
    weights = best_path or last_path or None  # no val/acc was logged (no validation): the last weights
    val = (trainer.validate(model, datamodule=datamodule, ckpt_path=weights, verbose=False) or [{}])[0]
    test = trainer.test(model, datamodule=datamodule, ckpt_path=weights, verbose=False)[0]
    epochs = max(1, trainer.current_epoch)
    metrics = {
        "precision": precision_name,
        "model": model.hparams.net,
        "data": model.hparams.data["name"],
        "seed": cfg.seed,
        "epochs": epochs,
        "val_acc": val.get("val/acc"), "val_loss": val.get("val/loss"),
        "test_acc": test["test/acc"], "test_loss": test["test/loss"],
        "wall_time_s": time.perf_counter() - start,
        "time_per_epoch_s": train_s / epochs,
        "best_checkpoint": best_path,
        "last_checkpoint": last_path,
    }
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
        config_text = OmegaConf.to_yaml(cfg, resolve=True)
        atomic_write(run_dir / "config.yaml", lambda tmp: tmp.write_text(config_text))
    return metrics


def check_resumable(ckpt: dict[str, Any], model: L.LightningModule, path: str, plugins: list[Any] | None = None,
                    max_epochs: int | None = None) -> None:
    """CheckpointError unless ``ckpt`` continues into this run: the same net (else its weights do not fit), the
    same optimizer (its state), the same fake-quant structure (else the run would silently train another
    precision and write checkpoints nothing loads), and epochs left to train."""
    keys = ("net", "net_kwargs", "input_shape", "num_classes")
    hparams = ckpt["hyper_parameters"]
    saved = {k: hparams.get(k) for k in keys}
    built = {k: model.hparams.get(k) for k in keys}
    if saved != built:  # both plain lists/dicts (Classifier saves plain hyperparameters)
        raise CheckpointError(f"resume checkpoint {path!r} was trained as {saved}, but this run builds {built}; "
                              f"resume with the model and data config of that run")
    was, now = (hparams.get("optimizer") or {}).get("name"), (model.hparams.get("optimizer") or {}).get("name")
    if was != now:
        raise CheckpointError(f"resume checkpoint {path!r} was trained with optimizer={was}, this run uses "
                              f"optimizer={now}; resume with optimizer={was}")
    qat = {type(p).__name__: p for p in plugins or [] if type(p).__name__ in STRUCTURAL_PLUGINS}
    for name in STRUCTURAL_PLUGINS:
        plugin, trained = qat.get(name), structural_config(ckpt, name)
        wanted = dict(plugin.config) if plugin is not None else None
        if trained != wanted:
            raise CheckpointError(f"resume checkpoint {path!r} was trained {_with(name, trained)}, this run's "
                                  f"precision is {_with(name, wanted)}; resume with the precision of that run "
                                  "(e.g. precision=int8)")
    done = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {}).get("processed")
    if isinstance(done, int) and max_epochs is not None and 0 < max_epochs <= done:
        raise CheckpointError(f"resume checkpoint {path!r} has trained {done} epoch(s) and trainer.max_epochs="
                              f"{max_epochs}: nothing is left to train; raise trainer.max_epochs")


def _with(name: str, config: dict[str, Any] | None) -> str:
    return f"with {name} {config}" if config is not None else f"without {name}"


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _app(cfg: DictConfig) -> float:
    """Entry point of ``lp-train``; returns the test accuracy (useful for sweeps). Bad input: exit 2."""
    hydra_cfg = HydraConfig.get()
    try:
        with share_file_handlers("lightning.pytorch", "lightning.fabric"):  # train.log gets Lightning's messages
            metrics = run(cfg, hydra_cfg.runtime.output_dir, hydra_cfg.runtime.choices.get("precision", "custom"))
    except (ValueError, FileNotFoundError, InstantiationException, MisconfigurationException) as exc:
        # invalid values (also in a plugin's or callback's arguments), an unusable resume checkpoint
        # (CheckpointError), an unsafe eps (EpsilonGuard), missing data files. HYDRA_FULL_ERROR=1: traceback;
        # in a sweep (-m) Hydra records the failed job and goes on with the others.
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or hydra_cfg.mode == RunMode.MULTIRUN:
            raise
        if rank_zero_only.rank == 0:
            print(f"lp-train: error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    val_acc = "n/a" if metrics["val_acc"] is None else f"{metrics['val_acc']:.4f}"
    print(f"test_acc={metrics['test_acc']:.4f} val_acc={val_acc} "
          f"time_per_epoch={metrics['time_per_epoch_s']:.2f}s -> {hydra_cfg.runtime.output_dir}/metrics.json")
    return metrics["test_acc"]


def _one_line(exc: BaseException) -> str:
    """The message of ``exc``, or of the ValueError/TypeError Hydra wrapped, with its config key, on one line."""
    cause = exc.__cause__
    if isinstance(exc, InstantiationException) and isinstance(cause, (ValueError, TypeError)):
        key = next((line.split(":", 1)[1].strip() for line in str(exc).splitlines() if line.startswith("full_key:")),
                   None)
        return f"{key}: {one_line(cause)}" if key else one_line(cause)
    return one_line(exc)


main = bad_config_exits_2(_app)

if __name__ == "__main__":
    main()
