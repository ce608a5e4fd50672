"""Optimizers and LR schedules from plain config dicts (YAML-friendly, checkpoint-safe)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adamax": torch.optim.Adamax,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
}
SCHEDULERS: dict[str, type[torch.optim.lr_scheduler.LRScheduler]] = {
    "cosine": torch.optim.lr_scheduler.CosineAnnealingLR,
    "step": torch.optim.lr_scheduler.StepLR,
}


def build_optimizer(params: Iterable[nn.Parameter], config: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``{"name": "adam", "lr": 1e-3, "eps": 1e-8, ...}`` -> optimizer; other keys go to the constructor."""
    kwargs = dict(config)
    name = kwargs.pop("name", "sgd")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={name!r} is unknown; allowed: {sorted(OPTIMIZERS)}")
    try:
        # foreach=False keeps optimizer state in the parameters' dtype on every torch build
        return OPTIMIZERS[name](params, foreach=False, **kwargs)
    except TypeError as exc:
        raise ValueError(f"optimizer {name!r} does not take these arguments {sorted(kwargs)}: {exc}") from exc
    except ValueError as exc:  # torch's own checks ("Invalid learning rate: -1"): name the config keys
        given = ", ".join(f"optimizer.{k}={v!r}" for k, v in kwargs.items())
        raise ValueError(f"optimizer {name!r} rejects {given}: {exc}") from exc


def build_scheduler(optimizer: torch.optim.Optimizer, config: Mapping[str, Any] | None,
                    max_epochs: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``None``, ``{"name": "cosine"}`` (over ``max_epochs``) or ``{"name": "step", "step_size", "gamma"}``."""
    if not config:
        return None
    kwargs = dict(config)
    name = kwargs.pop("name", None)
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler.name={name!r} is unknown; allowed: {list(SCHEDULERS)} or null")
    if name == "cosine":
        if "T_max" in kwargs:
            raise ValueError("model.scheduler.T_max is set from the run's length (max_epochs or max_steps); "
                             "leave it out")
        kwargs["T_max"] = max(1, max_epochs)
    try:
        return SCHEDULERS[name](optimizer, **kwargs)
    except TypeError as exc:  # a missing or unknown argument, e.g. step without step_size
        raise ValueError(f"model.scheduler {dict(config)}: {exc}") from exc
