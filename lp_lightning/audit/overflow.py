"""Overflow/underflow statistics of a tensor against a float dtype's range (pure torch, no Lightning)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

STAT_KEYS = ("nonfinite", "underflow_share", "overflow_share", "amax")


def _dtype(dtype: torch.dtype | str | None, t: Tensor) -> torch.dtype:
    if dtype is None:
        return t.dtype if t.is_floating_point() else torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"dtype={dtype!r} is not a float dtype; use e.g. 'float16', 'bfloat16', 'float32'")
        return resolved
    return dtype


@torch.no_grad()
def tensor_stats_raw(t: Tensor, dtype: torch.dtype | str | None = None) -> Tensor:
    """The four statistics of ``tensor_stats`` as one fp32 tensor ``[nonfinite, under, over, amax]``.

    Fast path (one host sync): when the plain ``amax`` is finite and at most half the max, nothing is
    non-finite or overflowing and only the underflow count is left to do.
    """
    info = torch.finfo(_dtype(dtype, t))
    a = t.detach().abs().float()
    n = a.numel()
    if n == 0:
        return torch.zeros(4)
    peak = float(a.amax())  # nan if any nan
    nonzero = int(torch.count_nonzero(a))
    if math.isfinite(peak) and peak <= info.max / 2:
        nonfinite, over, amax = 0, 0, peak
        below = int((a < info.tiny).sum()) - (n - nonzero)  # subnormal-range values, zeros excluded
    else:
        finite = torch.isfinite(a)
        nonfinite = n - int(finite.sum())
        over = int((a > info.max / 2).sum())  # inf counts as overflow; nan compares False
        amax = float(torch.where(finite, a, 0.0).amax())
        below = int(((a < info.tiny) & (a != 0)).sum())
        nonzero -= int(torch.isnan(a).sum())  # nan is nonzero for count_nonzero; inf stays out via below
        nonzero -= int(torch.isinf(a).sum())
    return torch.tensor([nonfinite, below / max(nonzero, 1), over / n, amax], dtype=torch.float32)


def tensor_stats(t: Tensor, dtype: torch.dtype | str | None = None) -> dict[str, float]:
    """Range statistics of ``t`` measured against ``dtype`` (default: ``t``'s own dtype).

    - ``nonfinite``: number of inf/nan entries;
    - ``underflow_share``: share of the nonzero finite entries with ``|x| < finfo(dtype).tiny`` (subnormal
      or about to flush: underflow risk; exact zeros, e.g. after ReLU, are not counted);
    - ``overflow_share``: share of all entries with ``|x| > finfo(dtype).max / 2`` (inf included);
    - ``amax``: the largest finite ``|x|`` (0 for an empty or all non-finite tensor).
    """
    values = tensor_stats_raw(t, dtype).tolist()
    out = dict(zip(STAT_KEYS, values, strict=True))
    out["nonfinite"] = int(out["nonfinite"])
    return out
