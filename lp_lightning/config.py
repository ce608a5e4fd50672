"""Config helpers shared by the Hydra apps: validation, precision selection, callbacks, data specs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import Precision
from omegaconf import DictConfig, ListConfig, OmegaConf

from lp_lightning.callbacks.epsilon_guard import EpsilonGuard
from lp_lightning.data import DATAMODULES
from lp_lightning.models.checkpoint import class_path, import_class

LIGHTNING_PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")
MONITOR_MODES = ("max", "min")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_TYPES: dict[str, tuple[type, ...]] = {
    "seed": (int,),
    "monitor": (str,),
    "trainer.max_epochs": (int,),
    "trainer.devices": (int, str, ListConfig),
    "data.batch_size": (int,),
    "data.seed": (int,),
    "data.val_fraction": (int, float),
    "data.test_fraction": (int, float),
    "optimizer.lr": (int, float),
    "optimizer.eps": (int, float),
    "optimizer.momentum": (int, float),
    "optimizer.weight_decay": (int, float),
}


def config_dir() -> str:
    """Absolute path of the Hydra config directory (works from any working directory)."""
    installed = Path(__file__).resolve().parent / "conf"  # wheel installs map conf/ to lp_lightning/conf
    return str(CONF_DIR if CONF_DIR.is_dir() else installed)


def compose_config(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """Compose a config of ``conf/`` with ``overrides`` outside a Hydra app (tools, benchmarks, tests)."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))


def validate(cfg: DictConfig) -> None:
    """Fail before training when a required value is missing or a known key holds a value of the wrong type
    (names the key and value)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"{', '.join(missing)} must be set (e.g. {missing[0]}=...): the config has no default")
    for key, types in _TYPES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            allowed = " or ".join("list" if t is ListConfig else t.__name__ for t in types)
            raise ValueError(f"{key}={value!r} has type {type(value).__name__}; expected {allowed}")
    mode = cfg.get("monitor_mode", "max")
    if mode not in MONITOR_MODES:
        raise ValueError(f"monitor_mode={mode!r} is not allowed; choose one of {list(MONITOR_MODES)}")


def lightning_precision(precision: str) -> str:
    """Lightning's own precision mode (its ``Trainer(precision=...)`` string), for ``conf/precision`` entries."""
    if precision not in LIGHTNING_PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of Lightning's modes {list(LIGHTNING_PRECISIONS)}")
    return precision


def precision_kwargs(precision_cfg: DictConfig | Mapping[str, Any]) -> tuple[dict[str, Any], list[Precision]]:
    """Trainer kwargs for a precision entry: ``precision=<Lightning's string>`` or ``plugins=[<plugin>]``."""
    if "_target_" not in precision_cfg:
        raise ValueError(f"a precision config needs '_target_' (a plugin or lightning_precision): {precision_cfg}")
    obj = instantiate(precision_cfg)
    return ({"precision": obj}, []) if isinstance(obj, str) else ({}, [obj])


def build_callbacks(callbacks_cfg: DictConfig | None) -> list[Callback]:
    """Instantiate every entry of the ``callbacks`` group (a mapping name -> ``_target_`` config).

    Every run is guarded against an optimizer eps its dtype loses: without an ``epsilon_guard`` entry an
    ``EpsilonGuard(action="raise", check_every_n_steps=0)`` is added, an entry without ``_target_``
    (``++callbacks.epsilon_guard.action=fix``) sets arguments of that guard, and ``epsilon_guard: null``
    turns it off. Any other entry without ``_target_`` is a ValueError.
    """
    entries = dict(callbacks_cfg or {})
    guard = entries.pop("epsilon_guard", {})
    if isinstance(guard, Mapping) and "_target_" not in guard:
        guard = {"_target_": f"{EpsilonGuard.__module__}.EpsilonGuard", "action": "raise",
                 "check_every_n_steps": 0, **guard}
    entries = {"epsilon_guard": guard, **entries}  # the guard first
    bad = [name for name, c in entries.items() if c is not None and not (isinstance(c, Mapping) and "_target_" in c)]
    if bad:
        raise ValueError(f"callbacks.{bad[0]} has no _target_; choose entries with callbacks=[...] "
                         f"(options: {sorted(p.stem for p in (Path(config_dir()) / 'callbacks').glob('*.yaml'))})")
    return [instantiate(c) for c in entries.values() if c is not None]


def model_extras(model_cfg: DictConfig, extras: Mapping[str, Any]) -> dict[str, Any]:
    """The ``extras`` (lp-train's ``input_shape``, ``num_classes``, ``optimizer``, ``data``) for the built-in
    Classifier (or a subclass of it), less those its config sets; None values are left out. Any other model gets
    only its own arguments: an argument of the same name (say ``optimizer: str``) means something else there."""
    from lp_lightning.models.classifier import Classifier

    try:  # a target that does not import: instantiate says why
        import_class(str(model_cfg.get("_target_", "")), Classifier, "model._target_")
    except ValueError:
        return {}
    return {k: v for k, v in extras.items() if k not in model_cfg and v is not None}


def data_name(datamodule: object) -> str:
    """A built-in datamodule's config name (``digits``), else the ``module.Class`` path of a user's own."""
    names = {cls: name for name, cls in DATAMODULES.items()}
    return names.get(type(datamodule)) or class_path(type(datamodule))


def data_spec(datamodule: object, data_cfg: DictConfig) -> dict[str, Any]:
    """Plain ``{"name": ..., **kwargs}`` describing the datamodule, stored in the model's checkpoint."""
    spec = {k: v for k, v in OmegaConf.to_container(data_cfg, resolve=True).items() if k != "_target_"}
    return {"name": data_name(datamodule), **spec}
