"""Rounding fp32 values to 16 bits: to nearest, stochastically (unbiased), or with a Kahan compensation term.

Stochastic rounding picks one of the two neighbouring 16-bit values with probability proportional to the
distance to the other one, so the expected result is the fp32 value: an update far below half an ulp of
the weight still moves it on average. bf16 is the upper half of an fp32 word, so adding a uniform 16-bit
integer to the fp32 bits and clearing the low half is exact; fp16 steps its round-to-nearest bit pattern to
the neighbour toward zero and goes one pattern up with the right probability (no ``where``/``nextafter``).

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


def _truncate_to_bf16_(dithered: Tensor) -> Tensor:
    """fp32 bit patterns plus signed 16-bit noise, shifted to unsigned noise and cut to bf16's upper half (in
    place): with uniform noise, stochastic rounding to bf16."""
    return dithered.add_(_HALF).bitwise_and_(_LOW_HALF_CLEARED)


def stochastic_round(x: Tensor, dtype: torch.dtype, generator: Noise = None) -> Tensor:
    """``x`` (fp32) rounded stochastically to ``dtype`` (bfloat16 or float16); non-finite values to nearest."""
    x = x.float()
    if dtype == torch.bfloat16:
        noise = random_bits16(x.numel(), x.device, generator).view(x.shape)
        bits = _truncate_to_bf16_(x.view(torch.int32) + noise)
        return torch.where(torch.isfinite(x), bits.view(torch.float32), x).to(dtype)
    if dtype == torch.float16:
        # fp16 bit patterns count up in magnitude: the neighbour toward zero is round-to-nearest's pattern, one
        # lower where that rounded away from zero (not past the largest finite value: overflow stays inf); the
        # other neighbour is one higher. Go up with probability (|x| - |low|) / (|high| - |low|).
        near = x.to(dtype)
        mag = x.abs()
        near_mag = near.float().abs_()
        low = near.view(torch.int16) - ((near_mag > mag) & (near_mag != torch.inf)).to(torch.int16)
        low_mag = low.view(dtype).float().abs_()
        frac = (mag - low_mag).div_((low + 1).view(dtype).float().abs_().sub_(low_mag))  # NaN for inf/NaN x
        noise = random_bits16(x.numel(), x.device, generator).view(x.shape)  # s + 32768 uniform on [0, 65535]
        return low.add_(noise < frac.mul_(65536).sub_(_HALF)).view(dtype)  # False for NaN: x kept
    raise ValueError(f"dtype={dtype!r} is not supported; allowed: torch.bfloat16, torch.float16")


def stochastic_round_(x: Tensor, dtype: torch.dtype, generator: Noise = None) -> Tensor:
    """Round fp32 ``x`` in place, stochastically, to values that ``dtype`` represents (a copy into ``dtype`` is
    then exact). Finite contiguous CPU values bound for bf16 take the in-place integer path (one draw, three
    passes); anything else goes through :func:`stochastic_round`, which keeps non-finite values."""
    if dtype == torch.bfloat16 and x.is_contiguous() and x.device.type == "cpu" and math.isfinite(x.sum()):
        noise = random_bits16(x.numel(), x.device, generator)  # a non-finite value poisons the sum
        _truncate_to_bf16_(x.view(torch.int32).view(-1).add_(noise))
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
