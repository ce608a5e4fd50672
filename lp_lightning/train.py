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
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from lp_lightning.cli import bad_config_exits_2, one_line
from lp_lightning.config import (
    build_callbacks,
    config_dir,
    data_name,
    data_spec,
    model_extras,
    precision_kwargs,
    validate,
)
from lp_lightning.io import atomic_write, write_json
from lp_lightning.logs import quiet_console, share_file_handlers
from lp_lightning.models import CheckpointError, Classifier, load_weights, read_checkpoint
from lp_lightning.models.checkpoint import STRUCTURAL_PLUGINS, model_id, restore_structure, structural_config
from lp_lightning.sweep import headline

CLASSIFIER_KEYS = ("net", "net_kwargs", "input_shape", "num_classes")  # what its weights' shapes depend on


class BestCheckpoint(ModelCheckpoint):
    """``best.ckpt`` by ``monitor``. When a validation ran without logging ``monitor`` it warns once, naming the
    logged keys, and writes nothing (last.ckpt and the last weights carry the run) instead of raising."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.missing = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking  # not Trainer.validate
        if fitting and not self.missing and self.monitor not in trainer.callback_metrics:
            self.missing = True
            rank_zero_warn(f"monitor={self.monitor!r} was not logged by {type(pl_module).__name__} (logged: "
                           f"{sorted(trainer.callback_metrics)}): no best.ckpt, the last weights are tested; "
                           "set monitor=<a logged key>")
        if not self.missing:
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.missing and self.monitor in trainer.callback_metrics:  # else: no validation (yet)
            super().on_train_epoch_end(trainer, pl_module)


def run(cfg: DictConfig, run_dir: str | Path, precision_name: str = "custom") -> dict[str, Any]:
    """Train and test one configuration; write checkpoints, ``config.yaml`` and ``metrics.json``."""
    validate(cfg)
    init_from = cfg.get("init_from")
    if init_from:
        if cfg.get("resume"):
            raise ValueError("resume= continues a run and init_from= starts a new one from a checkpoint's weights: "
                             "give one of them")
        cfg = finetune_config(cfg)
    run_dir = Path(run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    input_shape = getattr(datamodule, "input_shape", None)
    extras = model_extras(cfg.model, {  # the built-in Classifier's extras; a user's model gets none
        "input_shape": list(input_shape) if input_shape is not None else None,
        "num_classes": getattr(datamodule, "num_classes", None),
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True) if cfg.get("optimizer") else None,
        "data": data_spec(datamodule, cfg.data)})
    model = instantiate(cfg.model, **extras, _convert_="all")
    if init_from:
        load_weights(model, init_from)  # weights only: a new optimizer, schedule and epoch count
    trainer_kwargs, plugins = precision_kwargs(cfg.precision)
    # best.ckpt by the monitored metric; last.ckpt after every epoch (Lightning's save_last only follows best's saves)
    monitor, mode = cfg.get("monitor", "val/acc"), cfg.get("monitor_mode", "max")
    best = BestCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=monitor, mode=mode,
                          enable_version_counter=False)  # a rerun into the same run dir replaces best.ckpt
    last = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", enable_version_counter=False,
                           save_on_train_epoch_end=True)  # also when validation runs less often than every epoch
    timer = Timer()
    if cfg.trainer.get("enable_progress_bar") is None:  # null: the bar on a terminal, no frames in a file or pipe
        trainer_kwargs["enable_progress_bar"] = sys.stdout.isatty()
    trainer = instantiate(cfg.trainer, **trainer_kwargs, plugins=plugins, default_root_dir=str(run_dir),
                          logger=CSVLogger(str(run_dir), name="logs"),
                          callbacks=[best, last, timer, *build_callbacks(cfg.get("callbacks"))])
    resume = cfg.get("resume")
    if resume:  # one-line errors for a missing, corrupt, foreign or other-model file, before training
        ckpt = read_checkpoint(resume)
        check_resumable(ckpt, model, str(resume), plugins, trainer.max_epochs)
        model = restore_structure(model, ckpt)  # a fake-quant checkpoint's layers, for any model's state dict
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)
    # before validate/test restore the callbacks' state (paths, elapsed time) from best.ckpt
    best_path, last_path, train_s = best.best_model_path, last.best_model_path, timer.time_elapsed("train")
    best_score = best.best_model_score.item() if best_path and best.best_model_score is not None else None
    weights = best_path or last_path or None  # the monitor was not logged (or no validation): the last weights
    val = _merged(trainer.validate(model, datamodule=datamodule, ckpt_path=weights, verbose=False))
    test = _merged(trainer.test(model, datamodule=datamodule, ckpt_path=weights, verbose=False))
    epochs = max(1, trainer.current_epoch)
    metrics = {
        "precision": precision_name,
        "model": model_id(model),
        "data": data_name(datamodule),
        "seed": cfg.seed,
        "epochs": epochs,
        "val_acc": val.get("val/acc"), "val_loss": val.get("val/loss"),  # the built-in Classifier's metrics
        "test_acc": test.get("test/acc"), "test_loss": test.get("test/loss"),
        "monitor": monitor, "monitor_mode": mode, "best_score": best_score,
        "val": val, "test": test,  # every metric the model logged in Trainer.validate / Trainer.test
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


def _merged(results: list[dict[str, float]] | None) -> dict[str, float]:
    """One dict of what ``Trainer.validate``/``test`` returned (one dict per dataloader)."""
    return {k: v for result in results or [] for k, v in result.items()}


def finetune_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` for a run that starts from ``init_from``'s weights: the optimizer group's ``lr`` times
    ``finetune.lr_scale`` and ``trainer.max_epochs = finetune.max_epochs`` (each unless null)."""
    cfg = cfg.copy()
    tune = cfg.get("finetune") or {}
    scale, epochs = tune.get("lr_scale"), tune.get("max_epochs")
    for key, value, ok in (("lr_scale", scale, lambda v: v > 0), ("max_epochs", epochs, lambda v: v >= 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value)):
            raise ValueError(f"finetune.{key}={value!r} must be null or a positive number"
                             + (" (an integer >= 1)" if key == "max_epochs" else ""))
    if scale is not None and OmegaConf.select(cfg, "optimizer.lr") is not None:
        cfg.optimizer.lr = float(cfg.optimizer.lr) * float(scale)
    if epochs is not None:
        cfg.trainer.max_epochs = int(epochs)
    return cfg


def check_resumable(ckpt: dict[str, Any], model: L.LightningModule, path: str, plugins: list[Any] | None = None,
                    max_epochs: int | None = None) -> None:
    """CheckpointError unless ``ckpt`` continues into this run: the same model arguments (else its weights do not
    fit; for the built-in Classifier its net, shapes and optimizer, for any other model all its saved
    hyperparameters), the same fake-quant structure (else the run would silently train another precision and
    write checkpoints nothing loads), and epochs left to train."""
    hparams, built_hparams = ckpt.get("hyper_parameters") or {}, dict(model.hparams)
    if hparams and built_hparams:  # both plain lists/dicts (weights_only checkpoints, _convert_="all")
        classifier = isinstance(model, Classifier)
        keys = CLASSIFIER_KEYS if classifier else sorted(set(hparams) | set(built_hparams))
        saved = {k: hparams.get(k) for k in keys}
        built = {k: built_hparams.get(k) for k in keys}
        if saved != built:
            raise CheckpointError(f"resume checkpoint {path!r} was trained as {saved}, but this run builds {built}; "
                                  f"resume with the model and data config of that run")
        was = (hparams.get("optimizer") or {}).get("name") if classifier else None
        now = (built_hparams.get("optimizer") or {}).get("name") if classifier else None
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
    """Entry point of ``lp-train``; returns the monitor's test metric (useful for sweeps). Bad input: exit 2."""
    hydra_cfg = HydraConfig.get()
    try:
        # train.log gets all of Lightning's messages; the console each message once, without Lightning's
        # hardware/tip lines (verbose=true: all)
        quiet = quiet_console(bool(cfg.get("verbose", False)))
        with quiet, share_file_handlers("lightning.pytorch", "lightning.fabric"):
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
    key, value = headline(metrics)
    monitored = metrics["best_score"] if metrics["best_score"] is not None else metrics["val"].get(metrics["monitor"])
    print(f"{key or 'test'}={_number(value)} {metrics['monitor']}={_number(monitored)} "
          f"time_per_epoch={metrics['time_per_epoch_s']:.2f}s -> {hydra_cfg.runtime.output_dir}/metrics.json")
    return value


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


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
