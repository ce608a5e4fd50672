"""Rounding fp32 values to 16 bits: to nearest, stochastically (unbiased), or with a Kahan compensation term.

Stochastic rounding picks one of the two neighbouring 16-bit values with probability proportional to the
distance to the other one, so the expected result is the fp32 value: an update far below half an ulp of
the weight still moves it on average. bf16 is the upper half of an fp32 word, so adding a uniform 16-bit
integer to the fp32 bits and clearing the low half is exact; fp16 uses the two neighbours via nextafter.

Speed (CPU): a generator costs about the same per draw whatever its width, so the 16 random bits per value
are cut from 64-bit draws (four values per draw; numpy's SFC64 on CPU draws at half the cost of torch's
mt19937, a ``torch.Generator`` elsewhere), one flat buffer is rounded in place
(:func:`stochastic_round_`), and ``torch.isfinite`` gives way to one finiteness test of a sum, since on this
CPU it costs more than the rounding itself.
"""

from __future__ import annotations

import math
from typing import TypeAlias

import numpy as np
import torch
from torch import Tensor

Noise: TypeAlias = "torch.Generator | np.random.BitGenerator | None"  # numpy's: CPU only
_HALF = 1 << 15  # signed 16-bit noise + _HALF = uniform over [0, 65535]
_LOW_HALF_CLEARED = -65536  # 0xFFFF0000 as int32


def random_bits16(n: int, device: torch.device, generator: Noise = None) -> Tensor:
    """``n`` uniform 16-bit integers (int16; every bit pattern equally likely), four per 64-bit draw."""
    if isinstance(generator, np.random.BitGenerator):
        return torch.from_numpy(generator.random_raw((n + 3) // 4).view(np.int16)[:n]).to(device)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=generator)  # from the int64 minimum, no upper bound: all 64 bits random
    return words.view(torch.int16)[:n]


def stochastic_round(x: Tensor, dtype: torch.dtype, generator: Noise = None) -> Tensor:
    """``x`` (fp32) rounded stochastically to ``dtype`` (bfloat16 or float16); non-finite values to nearest."""
    x = x.float()
    if dtype == torch.bfloat16:
        noise = random_bits16(x.numel(), x.device, generator).view(x.shape)
        bits = (x.view(torch.int32) + noise).add_(_HALF).bitwise_and_(_LOW_HALF_CLEARED)
        return torch.where(torch.isfinite(x), bits.view(torch.float32), x).to(dtype)
    if dtype == torch.float16:
        near = x.to(dtype)
        nearf = near.float()
        toward = torch.where(x > nearf, torch.inf, -torch.inf).to(dtype)
        other = torch.nextafter(near, toward)
        gap = other.float() - nearf
        prob = torch.where(gap != 0, (x - nearf) / gap, torch.zeros_like(x))
        u = (random_bits16(x.numel(), x.device, generator).view(x.shape).float() + (_HALF + 0.5)) / 65536
        take = (u < prob) & torch.isfinite(x) & torch.isfinite(gap)
        return torch.where(take, other, near)
    raise ValueError(f"dtype={dtype!r} is not supported; allowed: torch.bfloat16, torch.float16")


def stochastic_round_(x: Tensor, dtype: torch.dtype, generator: Noise = None) -> Tensor:
    """Round fp32 ``x`` in place, stochastically, to values that ``dtype`` represents (a copy into ``dtype`` is
    then exact). Finite contiguous CPU values bound for bf16 take the in-place integer path (one draw, three
    passes); anything else goes through :func:`stochastic_round`, which keeps non-finite values."""
    if dtype == torch.bfloat16 and x.is_contiguous() and x.device.type == "cpu" and math.isfinite(x.sum()):
        noise = random_bits16(x.numel(), x.device, generator)  # a non-finite value poisons the sum
        x.view(torch.int32).view(-1).add_(noise).add_(_HALF).bitwise_and_(_LOW_HALF_CLEARED)
        return x
    return x.copy_(stochastic_round(x, dtype, generator))


def kahan_round(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``x`` rounded to nearest in ``dtype`` and the part the rounding dropped (also ``dtype``).

    Adding the dropped part back before the next rounding (``value.float() + comp.float()``) carries updates
    smaller than half an ulp across steps instead of losing them.
    """
    x = x.float()
    low = x.to(dtype)
    comp = torch.nan_to_num((x - low.float()).to(dtype), nan=0.0, posinf=0.0, neginf=0.0)
    return low, comp
