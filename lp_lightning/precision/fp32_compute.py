"""The ``fp32_accumulate`` compute mode: 16-bit storage, fp32 matrix products (what tensor cores do).

:class:`Fp32Accumulate` is a ``TorchDispatchMode``: it sits below autograd, so the autograd graph, the
tensors saved for backward, activations, gradients and optimizer state all keep their 16-bit dtype. Only
the matrix products (mm, addmm, bmm, baddbmm, convolution and their backward kernels, CPU attention) see
their 16-bit operands cast up to fp32, run the fast fp32 kernel, and round the result back to 16 bits.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

COMPUTE_MODES = ("auto", "native", "fp32_accumulate")

_aten = torch.ops.aten
_UPCAST = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.addbmm.default,
    _aten.addmv.default, _aten.mv.default, _aten.dot.default,
    _aten.convolution.default, _aten.convolution_backward.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
}
_FLASH_CPU = _aten._scaled_dot_product_flash_attention_for_cpu.default
# CPU flags of matrix units that run each 16-bit dtype natively (oneDNN kernels behind torch's CPU matmul).
_NATIVE_CPU_FLAGS = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16"),
}


class Fp32Accumulate(TorchDispatchMode):
    """Run matrix products on ``dtype`` operands in fp32 and round their results back to ``dtype``."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in _UPCAST:
            return func(*args, **kwargs)
        low = self.dtype
        # the matrix ops take their tensors as flat positional arguments: no pytree walk (it costs ~10 us)
        if not any(isinstance(a, Tensor) and a.dtype == low for a in args):
            return func(*args, **kwargs)  # not a 16-bit product: untouched
        up = [a.float() if isinstance(a, Tensor) and a.dtype == low else a for a in args]
        if kwargs:
            kwargs = tree_map_only(Tensor, lambda t: t.float() if t.dtype == low else t, kwargs)
        out = func(*up, **kwargs)
        if isinstance(out, Tensor):
            return out.to(low)
        if func is _FLASH_CPU:  # (output, logsumexp): the logsumexp is fp32 in the native kernel too
            return out[0].to(low), out[1]
        return type(out)(t.to(low) if isinstance(t, Tensor) and t.dtype == torch.float32 else t for t in out)


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_native_matmul(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether ``device`` multiplies ``dtype`` matrices on native 16-bit units (GPUs: yes; CPUs: by flags)."""
    device = torch.device(device)
    if device.type != "cpu":
        return True
    return any(flag in _cpu_flags() for flag in _NATIVE_CPU_FLAGS.get(dtype, ()))


def resolve_compute(compute: str, dtype: torch.dtype, device: torch.device | str) -> tuple[str, str]:
    """``(mode, reason)``: ``auto`` becomes ``native`` with native 16-bit matrix units, else ``fp32_accumulate``."""
    if compute != "auto":
        return compute, "requested"
    device = torch.device(device)
    name = str(dtype).removeprefix("torch.")
    if has_native_matmul(dtype, device):
        return "native", f"{device.type} has native {name} matrix units"
    return "fp32_accumulate", f"{device.type} has no native {name} matrix units (flags {_NATIVE_CPU_FLAGS[dtype]})"
