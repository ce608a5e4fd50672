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
