"""Rounding fp32 values to 16 bits: to nearest, stochastically (unbiased), or with a Kahan compensation term.

Stochastic rounding picks one of the two neighbouring 16-bit values with probability proportional to the
distance to the other one, so the expected result is the fp32 value: an update far below half an ulp of
the weight still moves it on average. bf16 is the upper half of an fp32 word, so adding a uniform 16-bit
integer to the fp32 bits and clearing the low half is exact; fp16 uses the two neighbours via nextafter.
"""

from __future__ import annotations

import torch
from torch import Tensor


def stochastic_round(x: Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> Tensor:
    """``x`` (fp32) rounded stochastically to ``dtype`` (bfloat16 or float16); non-finite values to nearest."""
    x = x.float()
    if dtype == torch.bfloat16:
        noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
        bits = (x.view(torch.int32) + noise).bitwise_and_(-65536)  # -65536 == 0xFFFF0000 as int32
        out = bits.view(torch.float32)
        return torch.where(torch.isfinite(x), out, x).to(dtype)
    if dtype == torch.float16:
        near = x.to(dtype)
        nearf = near.float()
        toward = torch.where(x > nearf, torch.inf, -torch.inf).to(dtype)
        other = torch.nextafter(near, toward)
        gap = other.float() - nearf
        prob = torch.where(gap != 0, (x - nearf) / gap, torch.zeros_like(x))
        u = torch.rand(x.shape, device=x.device, generator=generator)
        take = (u < prob) & torch.isfinite(x) & torch.isfinite(gap)
        return torch.where(take, other, near)
    raise ValueError(f"dtype={dtype!r} is not supported; allowed: torch.bfloat16, torch.float16")


def kahan_round(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``x`` rounded to nearest in ``dtype`` and the part the rounding dropped (also ``dtype``).

    Adding the dropped part back before the next rounding (``value.float() + comp.float()``) carries updates
    smaller than half an ulp across steps instead of losing them.
    """
    x = x.float()
    low = x.to(dtype)
    comp = (x - low.float()).to(dtype)
    comp = torch.where(torch.isfinite(comp), comp, torch.zeros_like(comp))
    return low, comp
