"""Normalization running statistics in fp32 inside a 16-bit module.

A 0.1-momentum update of a BatchNorm running mean/var is below bf16's resolution, so casting these buffers
to 16 bits freezes them (Apex O2 kept BatchNorm in fp32 for this reason). Here only the running statistics
stay fp32: the norm's weight and bias stay 16-bit, and during its forward they are cast up (a differentiable
cast, so their gradients come back 16-bit) next to the fp32 statistics. The input is cast up only where torch
has no mixed kernel (16-bit input, fp32 weight and statistics, 16-bit output; e.g. fp16 on CPU); the output
is always returned in the input's 16-bit dtype.

The hooks are module-level functions: a deep copy or a pickled module keeps them, and converting a module
twice does not add them twice.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

NORM_STATS = ("float32", "16bit")
_STATS = ("running_mean", "running_var")
_SAVED = "_lp_norm_affine"  # the 16-bit weight/bias while the forward runs on their fp32 casts


def check_norm_stats(norm_stats: str) -> str:
    """``norm_stats`` if allowed, else ValueError naming the allowed values."""
    if norm_stats not in NORM_STATS:
        raise ValueError(f"norm_stats={norm_stats!r} is not supported; allowed: {list(NORM_STATS)}")
    return norm_stats


def norm_layers(module: nn.Module) -> Iterator[_NormBase]:
    """BatchNorm1d/2d/3d, SyncBatchNorm and InstanceNorm1d/2d/3d layers that track running statistics."""
    for layer in module.modules():
        if isinstance(layer, _NormBase) and layer.track_running_stats and layer.running_mean is not None:
            yield layer


def cast_keeping_stats(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module.to(dtype)`` with the running statistics of its norm layers kept fp32 (from their values before
    the cast: fp32 statistics loaded into a fresh module lose nothing) and the layers' forwards hooked."""
    before = {id(layer): {name: getattr(layer, name) for name in _STATS} for layer in norm_layers(module)}
    module = module.to(dtype=dtype)
    for layer in norm_layers(module):
        for name, buf in before.get(id(layer), {}).items():
            if buf is not None and buf.is_floating_point():
                setattr(layer, name, buf.to(device=getattr(layer, name).device, dtype=torch.float32))
    keep_stats_fp32(module)
    return module


def keep_stats_fp32(module: nn.Module) -> int:
    """Cast the running statistics of every norm layer in ``module`` to fp32 and hook the layers' forwards.

    Returns the number of layers; idempotent.
    """
    count = 0
    for layer in norm_layers(module):
        for name in _STATS:
            buf = getattr(layer, name)
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(layer, name, buf.float())
        if _pre_forward not in layer._forward_pre_hooks.values():
            layer.register_forward_pre_hook(_pre_forward)
            layer.register_forward_hook(_post_forward, always_call=True)
        count += 1
    return count


def release_stats(module: nn.Module, dtype: torch.dtype) -> None:
    """Undo :func:`keep_stats_fp32`: remove the hooks and cast the statistics to ``dtype`` (16-bit statistics)."""
    for layer in norm_layers(module):
        for hooks, fn in ((layer._forward_pre_hooks, _pre_forward), (layer._forward_hooks, _post_forward)):
            for key in [k for k, v in hooks.items() if v is fn]:
                del hooks[key]
                getattr(layer, "_forward_hooks_always_called", {}).pop(key, None)
        for name in _STATS:
            buf = getattr(layer, name)
            if buf is not None and buf.is_floating_point():
                setattr(layer, name, buf.to(dtype))


def stats_bytes(module: nn.Module) -> int:
    """Bytes held by the fp32 running statistics (the extra over 16-bit statistics is half of this)."""
    return sum(getattr(layer, name).nbytes for layer in norm_layers(module) for name in _STATS
               if getattr(layer, name) is not None and getattr(layer, name).dtype == torch.float32)


def _pre_forward(layer: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0] if args else None
    stats = layer.running_mean
    if not isinstance(x, Tensor) or stats is None or stats.dtype != torch.float32 \
            or x.dtype not in (torch.float16, torch.bfloat16):
        return None  # an fp32 input (e.g. the module used outside the plugin) runs unchanged
    saved = {}
    for name in ("weight", "bias"):
        p = layer._parameters.get(name)
        if p is not None and p.dtype != torch.float32:
            saved[name] = p
            layer._parameters[name] = p.float()  # differentiable: the 16-bit parameter gets the gradient
    layer.__dict__[_SAVED] = (saved, x.dtype)
    if not _mixed_kernel(x.device.type, x.dtype):
        return (x.float(), *args[1:])
    return None


def _post_forward(layer: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    state = layer.__dict__.pop(_SAVED, None)
    if state is None:
        return None
    saved, dtype = state
    layer._parameters.update(saved)  # always called, also when the forward raised
    if isinstance(output, Tensor) and output.dtype != dtype:
        return output.to(dtype)
    return None


@functools.cache
def _mixed_kernel(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``F.batch_norm`` takes a 16-bit input with fp32 weight and statistics (forward and backward)."""
    try:
        x = torch.ones(2, 2, 2, dtype=dtype, device=device_type, requires_grad=True)
        w = torch.ones(2, device=device_type, requires_grad=True)
        y = F.batch_norm(x, torch.zeros(2, device=device_type), torch.ones(2, device=device_type), w,
                         torch.zeros(2, device=device_type), True, 0.1, 1e-5)
        y.sum().backward()
        return y.dtype == dtype and x.grad is not None and x.grad.dtype == dtype
    except (RuntimeError, NotImplementedError):
        return False
