"""The ``fp32_accumulate`` compute mode: 16-bit storage, fp32 matrix products (what tensor cores do).

:class:`Fp32Accumulate` is a ``TorchFunctionMode`` that intercepts only the matrix products at the Python
API level (``F.linear``, ``F.conv*``, ``matmul``/``mm``/``bmm``/``addmm``/``baddbmm``/``@``,
``F.scaled_dot_product_attention``; every other call passes straight through, so the mode costs nearly
nothing). A product on 16-bit operands casts them up to fp32 (differentiably), runs the fast fp32 kernel and
rounds the result back to 16 bits. Its backward runs the fp32 kernels too and the cast nodes round the
gradients back to 16 bits. Everything stored stays 16-bit: a ``saved_tensors_hooks`` pair stores the
product's saved fp32 tensors as the original 16-bit operands (views of them as the operand plus its strides,
anything else rounded to 16 bits) and casts them up again when backward needs them. The one exception is
attention's per-row logsumexp, kept in fp32 as the native 16-bit kernel keeps it.

On CPUs the fp32 copies of 2-d/3-d convolution operands are made channels-last (oneDNN's fast layout,
~2x faster than NCHW here); the convolution's 16-bit result then is channels-last too, as torch's own
convolution returns for channels-last weights (same values; ``.view`` on it needs ``.reshape``/``.flatten``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle
from torchmetrics import Metric

COMPUTE_MODES = ("auto", "native", "native_fp32_attention", "fp32_accumulate")

_SDPA = F.scaled_dot_product_attention
_PRODUCTS = frozenset({
    F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.addbmm, torch.mv, torch.addmv,
    torch.dot, torch.einsum,
    Tensor.matmul, Tensor.__matmul__, Tensor.mm, Tensor.bmm, Tensor.addmm, Tensor.baddbmm, Tensor.addbmm,
    Tensor.mv, Tensor.addmv, Tensor.dot,
    _SDPA,
})
# the products each mode runs in fp32 (``native_fp32_attention``: 16-bit kernels except attention, whose
# fused CPU kernel is ~14x slower in bf16 than in fp32 here: the vit's bf16 step was 3.2x fp32 because of it)
MODE_OPS: dict[str, frozenset] = {"fp32_accumulate": _PRODUCTS, "native_fp32_attention": frozenset({_SDPA})}
# convolutions whose fp32 copies are made channels-last (oneDNN's fast layout); the output keeps it
_CHANNELS_LAST = {F.conv2d: (4, torch.channels_last), F.conv_transpose2d: (4, torch.channels_last),
                  F.conv3d: (5, torch.channels_last_3d), F.conv_transpose3d: (5, torch.channels_last_3d)}
# CPU flags of matrix units that run each 16-bit dtype natively (oneDNN kernels behind torch's CPU matmul).
_NATIVE_CPU_FLAGS = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16"),
}


class _SavedAs16Bit:
    """``saved_tensors_hooks`` of one product: what autograd saves in fp32 is stored in 16 bits.

    An up-cast operand is stored as the 16-bit operand itself (no copy), a view of one as the operand plus
    the view's geometry; any other fp32 tensor is rounded to ``low`` (except those with fewer dims than
    ``keep_below_ndim``: attention's logsumexp). ``unpack`` casts up again.
    """

    def __init__(self, low: torch.dtype, upcast: dict[int, tuple[Tensor, torch.memory_format]],
                 keep_below_ndim: int = 0) -> None:
        self.low = low
        self.upcast = upcast  # id(fp32 copy) -> (16-bit operand, memory format of the copy)
        self.keep_below_ndim = keep_below_ndim

    def pack(self, t: Tensor) -> Any:
        if t.dtype != torch.float32 or t.dim() < self.keep_below_ndim:
            return t
        up = self.upcast.get(id(t))
        if up is not None:
            return up[0], up[1], None, up[0]._version
        base = t._base
        up = self.upcast.get(id(base)) if base is not None else None
        if up is not None:
            return up[0], up[1], (t.size(), t.stride(), t.storage_offset()), up[0]._version
        low = t.to(self.low)
        return low, torch.preserve_format, None, low._version

    @staticmethod
    def unpack(packed: Any) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        operand, memory_format, view, version = packed
        if operand._version != version:  # what autograd checks for the tensors it saves itself
            raise RuntimeError("one of the variables needed for gradient computation has been modified by an "
                               f"inplace operation: a {operand.dtype} operand of shape {tuple(operand.shape)} "
                               f"saved by Fp32Accumulate is at version {operand._version}; expected {version}")
        # the same layout as the fp32 copy made in forward, so the view geometry applies
        up = operand.to(torch.float32, memory_format=memory_format)
        return up if view is None else up.as_strided(*view)


def _checkpointing() -> bool:
    """Whether non-reentrant activation checkpointing's saved-tensor hooks are the innermost ones here.

    Then the products leave their saved tensors to it: ours would keep the 16-bit operands alive past the
    checkpointed segment, which checkpointing exists to free (it recomputes them in backward).
    """
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and hooks[0].__qualname__.startswith(("_checkpoint_hook.", "_recomputation_hook."))


class Fp32Accumulate(TorchFunctionMode):
    """Run matrix products on ``dtype`` operands in fp32 and round their results back to ``dtype``.

    Use it around the forward pass (``with Fp32Accumulate(torch.float16): loss = model(x)...``); the
    backward of the products it ran is fp32 with 16-bit gradients wherever backward runs.
    """

    def __init__(self, dtype: torch.dtype, ops: frozenset = _PRODUCTS) -> None:
        super().__init__()
        self.dtype = dtype
        self.ops = ops  # the products to run in fp32 (default: all of them)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in self.ops or "out" in kwargs:
            return func(*args, **kwargs)
        low = self.dtype
        # the products take their tensors as flat arguments: no pytree walk
        if not any(isinstance(a, Tensor) and a.dtype == low for a in (*args, *kwargs.values())):
            return func(*args, **kwargs)  # not a 16-bit product: untouched
        upcast: dict[int, tuple[Tensor, torch.memory_format]] = {}
        layout = _CHANNELS_LAST.get(func)
        up_args = [_up(a, low, upcast, layout) for a in args]
        if kwargs:
            kwargs = {k: _up(v, low, upcast, layout) for k, v in kwargs.items()}
        if not torch.is_grad_enabled() or _checkpointing():  # nothing saved, or checkpointing saves (it must
            return func(*up_args, **kwargs).to(low)  # see the same saved tensors in forward and recompute)
        keep = (args[0] if args else kwargs["query"]).dim() if func is _SDPA else 0
        hooks = _SavedAs16Bit(low, upcast, keep)
        with saved_tensors_hooks(hooks.pack, hooks.unpack):
            out = func(*up_args, **kwargs)
        return out.to(low)  # a convolution's result stays channels-last, as torch's own for channels-last weights


class ForwardScope:
    """:class:`Fp32Accumulate` around every forward of a module's layers (by hooks), while ``active``.

    A mode over Lightning's whole step would also intercept each torch call of the step's metrics and
    logging (~1 us each: 8% of an mlp step at batch 256); the hooks keep it to the layers' forwards.
    torchmetrics metrics are not hooked. The mode is entered by the outermost hooked forward only.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.ops: frozenset = _PRODUCTS  # what the mode runs in fp32 (MODE_OPS of the compute mode)
        self.active = False
        self._depth = 0
        self._mode: Fp32Accumulate | None = None
        self._handles: list[RemovableHandle] = []

    def __deepcopy__(self, memo: dict) -> ForwardScope:
        return self  # a copied module's hooks follow the plugin's context, as the original's do

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, module: nn.Module) -> None:
        """Hook ``module`` and its submodules (outside torchmetrics metrics)."""
        self.detach()
        for m in _layers(module):
            self._handles.append(m.register_forward_pre_hook(self._enter))
            self._handles.append(m.register_forward_hook(self._exit, always_call=True))

    def detach(self) -> None:
        self.reset()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Leave the mode if a forward did not (torch runs ``always_call`` hooks on ``Exception`` only, so a
        ``KeyboardInterrupt`` skips them)."""
        if self._mode is not None:
            stack = torch.overrides._get_current_function_mode_stack()
            if stack and stack[-1] is self._mode:
                self._mode.__exit__(None, None, None)
            self._mode = None
        self._depth = 0

    def _enter(self, module: nn.Module, args: Any) -> None:
        if self._depth == 0:
            if not self.active or _redirected(module):
                return
            self._mode = Fp32Accumulate(self.dtype, self.ops)
            self._mode.__enter__()
        self._depth += 1

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._depth == 0:  # entered while inactive
            return
        self._depth -= 1
        if self._depth == 0 and self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None


def _redirected(module: nn.Module) -> bool:
    """Whether the module's ``forward`` is replaced on the instance, as Lightning's forward redirection does
    under DDP to run ``training_step`` through the wrapper (then only the step's own ``self(x)`` is a forward)."""
    forward = module.__dict__.get("forward")
    return forward is not None and getattr(forward, "__func__", None) is not type(module).forward


def _layers(module: nn.Module) -> Iterator[nn.Module]:
    yield module
    for child in module.children():
        if not isinstance(child, Metric):
            yield from _layers(child)


def _up(value: Any, low: torch.dtype, upcast: dict[int, tuple[Tensor, torch.memory_format]],
        layout: tuple[int, torch.memory_format] | None = None) -> Any:
    """``value`` cast up to fp32 if it is a ``low`` tensor (recorded in ``upcast``), else ``value``.

    ``layout`` ``(ndim, memory_format)``: tensors of that many dims get that memory format (a free choice, the
    cast copies anyway: on CPUs channels-last fp32 convolutions run ~2x faster than NCHW ones).
    """
    if isinstance(value, Tensor) and value.dtype == low:
        fmt = layout[1] if layout is not None and value.dim() == layout[0] and value.is_cpu \
            else torch.preserve_format
        up = value.to(torch.float32, memory_format=fmt)
        upcast[id(up)] = (value, fmt)
        return up
    return value


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


def compute_candidates(compute: str, dtype: torch.dtype, device: torch.device | str) -> tuple[list[str], str]:
    """``(modes, reason)``: the modes ``compute`` may run, the flags' preference first.

    ``auto`` on a device with native 16-bit matrix units: native, native with fp32 attention, fp32_accumulate
    (which one is fastest depends on the model: a measurement decides); without such units only
    fp32_accumulate (native 16-bit products are emulated, ~170x slower for fp16 here). Any other value: itself.
    """
    if compute != "auto":
        return [compute], "requested"
    device = torch.device(device)
    name = str(dtype).removeprefix("torch.")
    if has_native_matmul(dtype, device):
        return (["native", "native_fp32_attention", "fp32_accumulate"],
                f"{device.type} has native {name} matrix units")
    return ["fp32_accumulate"], f"{device.type} has no native {name} matrix units (flags {_NATIVE_CPU_FLAGS[dtype]})"


def resolve_compute(compute: str, dtype: torch.dtype, device: torch.device | str) -> tuple[str, str]:
    """``(mode, reason)`` by the device's flags alone: ``auto`` becomes ``native`` with native 16-bit matrix units,
    else ``fp32_accumulate`` (the tie-breaker of the measured choice, see :class:`ComputeTrial`)."""
    modes, reason = compute_candidates(compute, dtype, device)
    return modes[0], reason
