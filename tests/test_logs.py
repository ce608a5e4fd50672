"""quiet_loggers: named loggers (and the root with "") raised for a block, restored also when it raises;
quiet_console: a CLI's console shows each message once, without Lightning's noise; log files keep all."""

from __future__ import annotations

import logging
import warnings

import pytest

from lp_lightning.logs import quiet_console, quiet_loggers


def test_quiet_loggers_raises_levels_for_the_block_and_restores_them(caplog: pytest.LogCaptureFixture) -> None:
    named, root = logging.getLogger("lp_test.noisy"), logging.getLogger()
    named.setLevel(logging.INFO)
    before = root.level
    with caplog.at_level(logging.INFO, logger="lp_test.noisy"):
        with pytest.raises(RuntimeError), quiet_loggers("", "lp_test.noisy", level=logging.ERROR):
            named.warning("hidden")
            assert root.level == logging.ERROR
            raise RuntimeError("boom")
        named.info("shown")
    assert [r.getMessage() for r in caplog.records] == ["shown"]
    assert named.level == logging.INFO and root.level == before
    with quiet_loggers("lp_test.noisy", level=logging.DEBUG):  # never lowers a level
        assert named.level == logging.INFO
    child = logging.getLogger("lp_test.noisy.child")  # no level of its own: the parent's INFO applies
    named.setLevel(logging.ERROR)
    with quiet_loggers("lp_test.noisy.child", level=logging.WARNING):
        assert child.getEffectiveLevel() == logging.ERROR
    assert child.level == logging.NOTSET


def _console(name: str) -> tuple[logging.Logger, list[str], logging.Handler]:
    """A logger with a console handler and a file-like handler recording what each receives."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    shown: list[str] = []
    console = logging.StreamHandler()
    console.emit = lambda record: shown.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(console)
    return logger, shown, console


def test_quiet_console_shows_each_message_once_without_noise_and_restores(tmp_path) -> None:
    logger, shown, console = _console("lp_test.quiet")
    logfile = logging.FileHandler(tmp_path / "run.log")
    logger.addHandler(logfile)
    try:
        with quiet_console(names=("lp_test.quiet",)):
            for message in ("GPU available: False, used: False", "💡 Tip: try litlogger", "plugin: 3 layers",
                            "plugin: 3 layers", "Restoring states from the checkpoint path at /x/best.ckpt"):
                logger.info(message)
            with warnings.catch_warnings(record=True) as caught:  # the block's filters, recorded
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
                warnings.warn("lp_test: another deprecation", FutureWarning, stacklevel=1)
        assert shown == ["plugin: 3 layers"]
        logger.info("plugin: 3 layers")  # after the block: unfiltered
        assert shown == ["plugin: 3 layers"] * 2 and not console.filters
        logfile.flush()
        assert (tmp_path / "run.log").read_text().count("\n") == 6  # the log file got everything
        with quiet_console(verbose=True, names=("lp_test.quiet",)):
            logger.info("GPU available: False, used: False")
        assert shown[-1].startswith("GPU available")
    finally:
        logger.removeHandler(console)
        logger.removeHandler(logfile)
        logfile.close()
    assert [str(w.message) for w in caught] == ["lp_test: another deprecation"]


def test_importing_lp_lightning_filters_no_warning() -> None:
    import lp_lightning  # noqa: F401

    assert not any("LeafSpec" in str(f[1].pattern if f[1] else "") for f in warnings.filters)
