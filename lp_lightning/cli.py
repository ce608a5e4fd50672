"""What the command-line apps share: one-line error messages, and exit 2 for a command line Hydra cannot compose."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import ConfigCompositionException, OverrideParseException


def bad_config_exits_2(hydra_main: Callable[[], Any], open_data: bool = False) -> Callable[[], Any]:
    """Wrap a ``@hydra.main`` entry point: when Hydra cannot compose the command line (unknown key or config
    option, malformed override) it prints its error and exits 1; exit 2 instead, since 1 is taken by the
    tools' results (threshold missed, violations found). Every other exit passes unchanged.

    ``open_data``: ``data.<arg>=`` overrides may add arguments (see :func:`addable_data_overrides`)."""

    @functools.wraps(hydra_main)
    def entry() -> Any:
        if open_data:
            sys.argv[1:] = addable_data_overrides(sys.argv[1:])
        try:
            return hydra_main()
        except SystemExit as exc:  # Hydra calls sys.exit(1) while handling the error: it is the context
            if exc.code == 1 and isinstance(exc.__context__, (ConfigCompositionException, OverrideParseException)):
                raise SystemExit(2) from None
            raise

    return entry


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """``exc``'s whole message on one line (its lines stripped and joined), cut to ``limit`` characters."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


_DATA_ARG = re.compile(r"^data\.[A-Za-z_][\w.]*=")


def addable_data_overrides(args: list[str]) -> list[str]:
    """``data.<arg>=v`` -> ``++data.<arg>=v``: a user's DataModule takes arguments the config does not list, so
    ``data._target_=pkg.MyDataModule data.root=/x`` works without Hydra's ``+`` (as in lp-train's data group)."""
    return [f"++{a}" if _DATA_ARG.match(a) else a for a in args]
