"""quiet_loggers: named loggers (and the root with "") raised for a block, restored also when it raises."""

from __future__ import annotations

import logging

import pytest

from lp_lightning.logs import quiet_loggers


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
