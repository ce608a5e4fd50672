"""Moving-average min/max observer for per-tensor asymmetric activation quantization (freezable)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lp_lightning.quant.fake_quantize import fake_quantize_per_tensor
from lp_lightning.quant.qparams import affine_qparams


class MovingAverageMinMaxObserver(nn.Module):
    """Tracks ``min``/``max`` of its input as a moving average and keeps the derived qparams.

    ``observe(x)`` updates the running range (the first batch sets it) unless frozen; ``scale`` and
    ``zero_point`` are recomputed after each update. Everything that matters is a buffer, so it is in the
    module's state dict (and therefore in Lightning checkpoints): ``min_val``, ``max_val``, ``scale``,
    ``zero_point``, ``frozen``.
    """

    def __init__(self, bits: int = 8, averaging_constant: float = 0.1) -> None:
        super().__init__()
        self.bits = bits
        self.averaging_constant = averaging_constant
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("frozen", torch.tensor(False))
        # python mirrors of two buffers, so the hot path needs no device sync; refreshed on load
        self._frozen = False
        self._initialized = False
        # clipping statistics (not state): measured only while ``measure`` is set (FakeQuantPrecision's log steps)
        self.measure = False
        self.clipped: float | None = None

    @property
    def quant_range(self) -> tuple[int, int]:
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    @property
    def initialized(self) -> bool:
        """True once the observer has seen at least one batch (or loaded a range)."""
        return self._initialized

    @property
    def is_frozen(self) -> bool:
        return self._frozen

    def freeze(self, frozen: bool = True) -> None:
        """Stop (or resume) updating the range; qparams keep their current values."""
        self._frozen = bool(frozen)
        self.frozen.fill_(self._frozen)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold the range of ``x`` into the moving average and refresh ``scale``/``zero_point``."""
        if self._frozen:
            return
        lo, hi = torch.aminmax(x.detach())
        if self._initialized:
            self.min_val.lerp_(lo.to(self.min_val.dtype), self.averaging_constant)
            self.max_val.lerp_(hi.to(self.max_val.dtype), self.averaging_constant)
        else:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        scale, zero_point = affine_qparams(self.min_val, self.max_val, self.bits)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self._initialized = True

    def fake_quantize(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` with the current qparams (straight-through gradient inside the range).

        Same values and gradients as ``torch.fake_quantize_per_tensor_affine`` (see ``quant.fake_quantize``).
        """
        qmin, qmax = self.quant_range
        return fake_quantize_per_tensor(x, self.scale.float(), self.zero_point, qmin, qmax)

    @torch.no_grad()
    def record_clipping(self, x: Tensor) -> None:
        """Store in ``clipped`` the fraction of ``x`` outside the representable range (by more than half a step)."""
        qmin, qmax = self.quant_range
        scale, zp = float(self.scale), int(self.zero_point)
        lo, hi = (qmin - zp - 0.5) * scale, (qmax - zp + 0.5) * scale
        x = x.detach()
        self.clipped = float(((x < lo) | (x > hi)).sum()) / max(x.numel(), 1)

    @property
    def width(self) -> float:
        """The observed range's width ``max_val - min_val`` (0 before any observation)."""
        return float(self.max_val - self.min_val) if self._initialized else 0.0

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.refresh_flags()

    def refresh_flags(self) -> None:
        """Re-read ``frozen`` and whether a range was seen from the buffers (after a load or a broadcast)."""
        self._frozen = bool(self.frozen)
        self._initialized = bool(torch.isfinite(self.min_val) & torch.isfinite(self.max_val))

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, averaging_constant={self.averaging_constant}, frozen={self._frozen}, "
                f"min={float(self.min_val):.4g}, max={float(self.max_val):.4g}")


@torch.no_grad()
def broadcast_observers(observers: Iterable[MovingAverageMinMaxObserver], src: int = 0) -> None:
    """Give every process ``src``'s observer buffers, in one collective; a no-op outside ``torch.distributed``.

    DDP broadcasts buffers only before a forward that follows a gradient-syncing one, so with gradient
    accumulation the ranks' ranges drift apart; FakeQuantPrecision calls this before every training step.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    observers = list(observers)
    if not observers:
        return
    buffers = [b for obs in observers for b in obs.buffers()]
    flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in buffers])  # int32/bool exact in float64
    dist.broadcast(flat, src=src)
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()
    for obs in observers:
        obs.refresh_flags()
