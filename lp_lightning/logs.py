"""Logging helpers shared by the apps and exporters."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# Lightning's lines that say nothing about the run: the hardware lines, the tips, the reloads of our own
# validate/test(ckpt_path=best) calls, the normal end of fit. They still go to the run's log file.
NOISE = re.compile(r"^(GPU|TPU|HPU|IPU) available:|^💡 Tip:|^LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES"
                   r"|^Restoring states from the checkpoint path at |^Loaded model weights from the checkpoint at "
                   r"|^`Trainer.fit` stopped: `max_epochs=\d+` reached")
# third-party deprecations our users cannot act on: (category, message regex)
KNOWN_DEPRECATIONS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # lightning's _pytree on torch >= 2.9
)
CONSOLE_LOGGERS = ("lightning.pytorch", "lightning.fabric", "")


class OncePerRun(logging.Filter):
    """Drops :data:`NOISE` and every message already let through (a plugin converting the module for fit,
    validate and test says the same thing three times)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if NOISE.search(message) or message in self.seen:
            return False
        self.seen.add(message)
        return True


@contextmanager
def quiet_console(verbose: bool = False, names: tuple[str, ...] = CONSOLE_LOGGERS) -> Iterator[None]:
    """For one CLI run: the console handlers of the named loggers show each message once and no :data:`NOISE`,
    and :data:`KNOWN_DEPRECATIONS` are ignored. Log files keep everything. ``verbose``: change nothing.

    Only our CLIs enter this; importing lp_lightning filters nothing."""
    if verbose:
        yield
        return
    once = OncePerRun()
    handlers = {h for name in names for h in logging.getLogger(name).handlers if not isinstance(h, logging.FileHandler)}
    with warnings.catch_warnings():
        for category, message in KNOWN_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for handler in handlers:
            handler.addFilter(once)
        try:
            yield
        finally:
            for handler in handlers:
                handler.removeFilter(once)


@contextmanager
def quiet_loggers(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise the named loggers (``""``: the root logger) to at least ``level`` for a block; never lower one."""
    loggers = [logging.getLogger(n) for n in names]
    old = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(max(level, lg.getEffectiveLevel()))
        yield
    finally:
        for lg, lv in zip(loggers, old, strict=True):
            lg.setLevel(lv)


@contextmanager
def share_file_handlers(*names: str) -> Iterator[None]:
    """Give the named loggers the root logger's file handlers for a block (Hydra's ``<job>.log``).

    Lightning's loggers do not propagate to the root logger, so without this the job's log file stays empty.
    """
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    added = [(lg, h) for lg in map(logging.getLogger, names) for h in files if h not in lg.handlers]
    for lg, h in added:
        lg.addHandler(h)
    try:
        yield
    finally:
        for lg, h in added:
            lg.removeHandler(h)
