"""Exit codes of the Hydra apps: a command line Hydra cannot compose is bad input (2), like the apps' own errors."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig


def bad_config_exits_2(hydra_main: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap a ``@hydra.main`` entry point: when Hydra fails before the task runs (unknown key or config
    option, malformed override) it prints its error and exits 1; exit 2 instead, since 1 is taken by the
    tools' results (threshold missed, violations found). Exits of the task itself pass unchanged."""

    @functools.wraps(hydra_main)
    def entry() -> Any:
        HydraConfig.instance().cfg = None  # set again by Hydra just before it calls the task
        try:
            return hydra_main()
        except SystemExit as exc:
            if exc.code == 1 and not HydraConfig.initialized():
                raise SystemExit(2) from None
            raise

    return entry
