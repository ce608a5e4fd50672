"""Logging helpers shared by the apps and exporters."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


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
