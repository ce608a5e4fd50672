"""Range tracking that follows the activations: the observer's default memory, clipped fraction and range
growth per layer, the warning naming a layer that keeps clipping (issue 17, item 1)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lp_lightning.quant import FakeQuantLinear, MovingAverageMinMaxObserver, QuantSpec
from lp_lightning.quant.range_monitor import RangeMonitor


def test_default_observer_follows_a_growing_activation() -> None:
    """Activations growing 2% per step (as early in training): after 100 steps the default observer's max is
    within 25% of the batch max (averaging constant 0.01 sits ~2x below it and clips)."""
    obs, lagging = MovingAverageMinMaxObserver(), MovingAverageMinMaxObserver(averaging_constant=0.01)
    x = torch.linspace(-1.0, 1.0, 101)
    for step in range(100):
        batch = x * 1.02 ** step
        obs.observe(batch)
        lagging.observe(batch)
    peak = float(batch.max())
    assert QuantSpec().averaging_constant == obs.averaging_constant == 0.1
    assert float(obs.max_val) > 0.75 * peak
    assert float(lagging.max_val) < 0.6 * peak  # the old default lags


def _layer() -> FakeQuantLinear:
    torch.manual_seed(0)
    return FakeQuantLinear.from_float(torch.nn.Linear(4, 2), QuantSpec(), "head")


def test_clipped_fraction_and_range_growth_are_measured_when_armed() -> None:
    layer = _layer().train()
    layer(torch.linspace(-1, 1, 400).reshape(100, 4))  # range [-1, 1]
    monitor = RangeMonitor({"head": layer})
    layer.eval()(torch.zeros(3, 4))
    assert monitor.collect() == {}  # not armed: nothing measured
    monitor.arm()
    layer(torch.linspace(-2, 2, 400).reshape(100, 4))  # half of it outside [-1, 1]
    stats = monitor.collect()
    assert stats["clipped/head"] == pytest.approx(0.5, abs=0.02)
    monitor.arm()
    layer.train()(torch.linspace(-3, 3, 400).reshape(100, 4))  # the range grows by 10% of the way to 3
    stats = monitor.collect()
    assert stats["range_growth/head"] == pytest.approx(0.2, abs=0.01)
    assert not monitor.armed


def test_a_layer_that_keeps_clipping_is_named_once() -> None:
    layer = _layer().train()
    layer(torch.linspace(-1, 1, 400).reshape(100, 4))
    layer.eval()
    monitor = RangeMonitor({"net.head": layer}, warn_above=0.01, patience=3)
    wide = torch.linspace(-1.5, 1.5, 400).reshape(100, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            monitor.arm()
            layer(wide)
            monitor.collect()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "'net.head'" in messages[0] and "averaging_constant" in messages[0]
    assert set(monitor.above()) == {"net.head"}
