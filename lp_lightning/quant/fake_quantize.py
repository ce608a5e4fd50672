"""Fake-quantize with a straight-through estimator: torch's ops, or a vectorized equivalent for training.

torch's ``fake_quantize_per_{tensor,channel}_affine`` CPU kernels round each element with
``std::nearbyint`` in a scalar loop (~3.7 ns per element here, about as long as the layer's matmul on a
small MLP). ``_FakeQuantizeSTE`` computes the same formula with vectorized tensor ops,
``(clamp(round(x * (1 / scale)) + zp, qmin, qmax) - zp) * scale`` in float32, with the same gradient
(``grad * (qmin <= round(x / scale) + zp <= qmax)``); tests check both paths agree bit for bit.
torch's ops are used while exporting to ONNX (they become QuantizeLinear/DequantizeLinear), under
``torch.compile``, for non-float32 inputs, and inside ``torch_fake_quant_ops()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

_FORCE_TORCH_OPS = False


@contextlib.contextmanager
def torch_fake_quant_ops(enabled: bool = True) -> Iterator[None]:
    """Use torch's fake-quantize ops (instead of the vectorized equivalent) inside this block."""
    global _FORCE_TORCH_OPS
    previous, _FORCE_TORCH_OPS = _FORCE_TORCH_OPS, enabled
    try:
        yield
    finally:
        _FORCE_TORCH_OPS = previous


def _use_torch_ops(x: Tensor) -> bool:
    return (_FORCE_TORCH_OPS or x.dtype != torch.float32 or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling())


class _FakeQuantizeSTE(torch.autograd.Function):
    """Affine fake quantization; backward passes the gradient where the value was not clamped."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int,
                clips: bool = True) -> Tensor:
        q = torch.round(x * torch.reciprocal(scale))
        if zero_point is not None:
            q.add_(zero_point)
        clamped = q.clamp(qmin, qmax)
        ctx.clips = clips
        if clips and ctx.needs_input_grad[0]:
            # 1.0 inside [qmin, qmax], else 0.0; a float mask (eq into a float out) is ~5x faster here than bool
            ctx.save_for_backward(torch.eq(clamped, q, out=torch.empty_like(q)))
        if zero_point is not None:
            clamped.sub_(zero_point)
        return clamped.mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:
        if not ctx.clips:
            return grad, None, None, None, None, None
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None, None


def fake_quantize_per_tensor(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``torch.fake_quantize_per_tensor_affine`` with 0-dim tensor ``scale`` (float32) / ``zero_point`` (int32)."""
    if _use_torch_ops(x):
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    if x.device.type == "cpu":  # clamp(q + zp, qmin, qmax) - zp == clamp(q, qmin - zp, qmax - zp): two passes fewer
        zp = int(zero_point)  # (reading it is free on CPU; on a GPU it would wait for the device)
        return _FakeQuantizeSTE.apply(x, scale, None, qmin - zp, qmax - zp)
    return _FakeQuantizeSTE.apply(x, scale, zero_point.float(), qmin, qmax)


def fake_quantize_per_channel(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                              symmetric: bool = False, clips: bool = True) -> Tensor:
    """``torch.fake_quantize_per_channel_affine`` along axis 0 (``scale``/``zero_point`` of shape ``(C,)``).

    ``symmetric=True`` promises that ``zero_point`` is all zeros and skips adding/subtracting it;
    ``clips=False`` promises that no value lands outside ``[qmin, qmax]`` (true for ``scale = max|x| / qmax``),
    so the gradient mask is all ones and is not computed.
    """
    if _use_torch_ops(x):
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, 0, qmin, qmax)
    shape = (-1,) + (1,) * (x.dim() - 1)
    zp = None if symmetric else zero_point.float().reshape(shape)
    return _FakeQuantizeSTE.apply(x, scale.reshape(shape), zp, qmin, qmax, clips)
