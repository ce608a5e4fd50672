"""Quantization-parameter math: symmetric weight scales (per channel / per group), affine activation qparams."""

from __future__ import annotations

import torch
from torch import Tensor

from lp_lightning.quant.fake_quantize import fake_quantize_per_channel

EPS = torch.finfo(torch.float32).eps


def affine_qparams(min_val: Tensor, max_val: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Scale and int32 zero point mapping ``[min(min_val, 0), max(max_val, 0)]`` onto the signed range.

    The range always contains 0, so 0 is exactly representable (zero padding stays exact).
    """
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo = torch.clamp(min_val.float(), max=0.0)
    hi = torch.clamp(max_val.float(), min=0.0)
    scale = torch.clamp((hi - lo) / float(qmax - qmin), min=EPS)
    zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def symmetric_weight_scale(weight: Tensor, bits: int, group_size: int | None = None) -> Tensor:
    """Per-output-channel (shape ``(out,)``) or per-group (shape ``(out, K // group_size)``) scales.

    ``K`` is the number of weights of one output channel; ``scale = max|w| / (2^(bits-1) - 1)``, so the
    largest weight of a channel/group lands exactly on the largest positive integer.
    """
    w = weight.detach().float().reshape(weight.shape[0], -1)
    if group_size is not None:
        w = w.reshape(w.shape[0], -1, group_size)
    amax = w.abs().amax(dim=-1)  # much faster on CPU than linalg.vector_norm(ord=inf) or aminmax(dim)
    return torch.clamp(amax / float(2 ** (bits - 1) - 1), min=EPS)


def fake_quantize_weight(weight: Tensor, scale: Tensor, zero_point: Tensor, bits: int,
                         group_size: int | None = None) -> Tensor:
    """Per-channel fake quantization of the weight (torch's op or its exact equivalent; straight-through).

    ``zero_point`` must be zeros (symmetric weights) and ``scale`` from ``symmetric_weight_scale`` (nothing clips).

    Per group: the weight is viewed as ``(out * K // group_size, group_size)`` so each row is one group.
    """
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if group_size is None:
        return fake_quantize_per_channel(weight, scale, zero_point, qmin, qmax, symmetric=True, clips=False)
    rows = weight.reshape(-1, group_size)
    out = fake_quantize_per_channel(rows, scale.reshape(-1), zero_point.reshape(-1), qmin, qmax, symmetric=True,
                                    clips=False)
    return out.reshape(weight.shape)


def integer_weight(weight: Tensor, scale: Tensor, bits: int, group_size: int | None = None) -> Tensor:
    """The integer grid values ``round(w / scale)`` clamped to the signed range (int8 tensor, weight's shape)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    w = weight.detach().float().reshape(weight.shape[0], -1)
    if group_size is not None:
        w = w.reshape(w.shape[0], -1, group_size)
    q = torch.round(w / scale.float().unsqueeze(-1))
    return torch.clamp(q, qmin, qmax).to(torch.int8).reshape(weight.shape)
