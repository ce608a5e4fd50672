"""Per-layer activation-range health during QAT: clipped fraction and range growth, warnings naming the layer.

A range that lags behind its activations clips them at every step (a moving-average observer with a long
memory on a growing activation: a held-out depthwise-separable CNN showed ~4% of one layer's inputs clipped
at every step on bad seeds). ``RangeMonitor`` measures, on the steps it is armed for, each layer's fraction of
inputs outside its representable range and how much its observed range grew since the last measurement, and says once
per layer when clipping stays above ``warn_above`` for ``patience`` measurements in a row.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from lp_lightning.quant.modules import FakeQuantModule


class RangeMonitor:
    """Clipping/range statistics of the activation observers of ``layers`` (name -> fake-quant layer)."""

    def __init__(self, layers: Mapping[str, FakeQuantModule], warn_above: float = 0.01, patience: int = 3) -> None:
        self.observers = {n: layer.act_observer for n, layer in layers.items() if layer.act_observer is not None}
        self.warn_above = warn_above
        self.patience = patience
        self._widths: dict[str, float] = {}
        self._over: dict[str, int] = dict.fromkeys(self.observers, 0)
        self.warned: set[str] = set()

    def arm(self, armed: bool = True) -> None:
        """Measure clipping in the next forward passes (training or not) until disarmed."""
        for obs in self.observers.values():
            obs.measure = armed
            if armed:
                obs.clipped = None

    @property
    def armed(self) -> bool:
        return any(obs.measure for obs in self.observers.values())

    def collect(self) -> dict[str, float]:
        """Disarm and return ``{"clipped/<layer>": fraction, "range_growth/<layer>": relative growth}`` for the
        layers measured; warn (once per layer) when one clipped more than ``warn_above`` ``patience`` times in a row."""
        self.arm(False)
        stats: dict[str, float] = {}
        for name, obs in self.observers.items():
            if obs.clipped is None:
                continue
            stats[f"clipped/{name}"] = obs.clipped
            width, before = obs.width, self._widths.get(name)
            if before:
                stats[f"range_growth/{name}"] = width / before - 1.0
            self._widths[name] = width
            self._over[name] = self._over[name] + 1 if obs.clipped > self.warn_above else 0
            if self._over[name] >= self.patience and name not in self.warned:
                self.warned.add(name)
                warnings.warn(f"FakeQuantPrecision: layer {name!r} clips {obs.clipped:.1%} of its inputs "
                              f"(above {self.warn_above:.0%} for {self._over[name]} measurements in a row): its "
                              "activation range lags behind its activations; raise averaging_constant (now "
                              f"{obs.averaging_constant}), do not freeze its observer yet, or skip the layer "
                              f"(skip=[{name!r}])", stacklevel=2)
        return stats

    def above(self) -> dict[str, float]:
        """The layers whose last measured clipped fraction is above ``warn_above``."""
        return {n: o.clipped for n, o in self.observers.items()
                if o.clipped is not None and o.clipped > self.warn_above}
