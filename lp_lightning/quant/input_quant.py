"""Activation quantize/dequantize on a plain layer's input, with fixed (learned) qparams: what ``convert`` keeps.

A converted layer stays its plain torch type with the plain state-dict keys: the qparams are NON-persistent
buffers (``input_scale``, ``input_zero_point``; they move with ``.to()`` and survive ``deepcopy``) and a forward
pre-hook fake-quantizes the input exactly as the fake-quant layer did in eval mode, so the converted model
computes the function QAT trained (bit for bit on CPU float32).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lp_lightning.quant.fake_quantize import fake_quantize_per_tensor


def _quantize_input_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    qmin, qmax = module.input_qrange
    x = fake_quantize_per_tensor(args[0], module.input_scale.float(), module.input_zero_point, qmin, qmax)
    return (x, *args[1:])


def attach_input_quant(layer: nn.Module, scale: Tensor, zero_point: Tensor, bits: int) -> nn.Module:
    """Make ``layer`` (in place) fake-quantize its input with ``scale``/``zero_point`` (affine, signed ``bits``)."""
    layer.register_buffer("input_scale", scale.detach().clone().float(), persistent=False)
    layer.register_buffer("input_zero_point", zero_point.detach().clone().to(torch.int32), persistent=False)
    layer.input_qrange = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    layer.register_forward_pre_hook(_quantize_input_hook)
    return layer


def has_input_quant(layer: nn.Module) -> bool:
    """True when ``layer`` fake-quantizes its input (``attach_input_quant``)."""
    return any(hook is _quantize_input_hook for hook in layer._forward_pre_hooks.values())
