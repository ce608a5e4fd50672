"""Overflow/underflow statistics of a tensor against a float dtype's range (pure torch, no Lightning)."""

from __future__ import annotations

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
    """The four statistics of ``tensor_stats`` as one fp32 tensor (no host sync; cheap to stack)."""
    info = torch.finfo(_dtype(dtype, t))
    a = t.detach().abs().float()
    finite = torch.isfinite(a)
    nonfinite = (~finite).sum()
    nonzero = (a != 0) & finite
    n_nonzero = nonzero.sum()
    under = (nonzero & (a < info.tiny)).sum()
    over = (a > info.max / 2).sum()  # inf counts as overflow; nan compares False
    amax = torch.where(finite, a, torch.zeros((), dtype=a.dtype)).amax() if a.numel() else a.new_zeros(())
    n = max(a.numel(), 1)
    return torch.stack([nonfinite.float(), under.float() / n_nonzero.clamp(min=1).float(), over.float() / n,
                        amax.float()])


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
