"""Loss scaling that works on 16-bit gradients (``torch.amp.GradScaler`` refuses fp16 gradients).

The gradients are unscaled in place in their own dtype; a step whose gradients hold an inf/nan is skipped,
and a dynamic scale backs off on such a step and grows after ``growth_interval`` clean steps in a row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


class LossScaler:
    """Static or dynamic loss scale for pure 16-bit training.

    Args:
        init_scale: the first scale (positive, finite).
        dynamic: grow/back off the scale (``False``: a fixed scale that still skips non-finite steps).
        growth_factor, backoff_factor: multipliers on growth (> 1) and on an overflow (in (0, 1)).
        growth_interval: clean steps in a row before the scale grows.
        max_scale: the scale never grows beyond this (``2**24`` keeps ``scale * loss`` finite in fp32).
    """

    def __init__(self, init_scale: float = 2.0**16, dynamic: bool = True, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, max_scale: float = 2.0**24) -> None:
        _check_positive("init_scale", init_scale)
        if not growth_factor > 1.0 or not math.isfinite(growth_factor):
            raise ValueError(f"growth_factor={growth_factor!r} must be a finite number > 1")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor={backoff_factor!r} must be in (0, 1)")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"growth_interval={growth_interval!r} must be an int >= 1")
        self.scale = float(init_scale)
        self.dynamic = dynamic
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.max_scale = float(max_scale)
        self.growth_tracker = 0
        self.skipped_steps = 0

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss * scale``, in the loss's dtype: a 16-bit loss overflows there from ``finfo.max / |loss|`` on
        (65504 in fp16), which :class:`PureHalfPrecision` warns about; compute the loss on fp32 logits."""
        return loss * self.scale

    @torch.no_grad()
    def unscale_(self, params: Iterable[Tensor], scale: float | None = None) -> bool:
        """Divide every ``.grad`` by ``scale`` (default: the current scale) in place; True if any is inf/nan."""
        by_device: dict[torch.device, list[Tensor]] = {}
        for p in params:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:  # unscale the values in place: coalesce the gradient itself first, as GradScaler does
                if not g.is_coalesced():
                    p.grad = g = g.coalesce()
                g = g._values()
            by_device.setdefault(g.device, []).append(g)
        if not by_device:
            return False
        inv = 1.0 / (self.scale if scale is None else scale)
        found = False
        for device, group in by_device.items():
            # explicit fp32: in manual loops this runs under the plugin's 16-bit default dtype
            found_inf = torch.zeros(1, dtype=torch.float32, device=device)
            inv_scale = torch.full((1,), inv, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale)
            found = found or bool(found_inf.item())
        return found

    def update(self, found_inf: bool) -> None:
        """Count a skipped step; back off on overflow, grow after ``growth_interval`` clean steps."""
        if found_inf:
            self.skipped_steps += 1
        if not self.dynamic:
            return
        if found_inf:
            self.scale = max(self.scale * self.backoff_factor, torch.finfo(torch.float32).tiny)
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker >= self.growth_interval:
            self.scale = min(self.scale * self.growth_factor, self.max_scale)
            self.growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        """Plain values (loads with ``torch.load(weights_only=True)``)."""
        return {"scale": self.scale, "growth_tracker": self.growth_tracker, "skipped_steps": self.skipped_steps,
                "dynamic": self.dynamic, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scale and counters (the growth/backoff settings stay those of the constructor)."""
        _check_positive("scale", state["scale"])
        self.scale = float(state["scale"])
        self.growth_tracker = int(state.get("growth_tracker", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive finite number")


def make_scaler(loss_scale: str | float | None, init_scale: float, growth_factor: float, backoff_factor: float,
                growth_interval: int) -> LossScaler | None:
    """The scaler for PureHalfPrecision's ``loss_scale`` (None, ``"dynamic"`` or a positive number); the other
    settings are checked even when no scaler is made."""
    if loss_scale is None or (isinstance(loss_scale, str) and loss_scale.lower() in ("none", "null")):
        LossScaler(init_scale, True, growth_factor, backoff_factor, growth_interval)  # checks the settings anyway
        return None
    if isinstance(loss_scale, str) and loss_scale.lower() == "dynamic":
        return LossScaler(init_scale, True, growth_factor, backoff_factor, growth_interval)
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not math.isfinite(loss_scale) \
            or loss_scale <= 0:
        raise ValueError(f"loss_scale={loss_scale!r} is not supported; allowed: None, 'dynamic' or a positive "
                         f"finite number")
    return LossScaler(float(loss_scale), False, growth_factor, backoff_factor, growth_interval)
