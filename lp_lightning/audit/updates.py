"""Parameter updates lost to rounding, and running statistics that stopped moving (pure torch, no Lightning).

An optimizer step adds an update ``u`` to a weight ``w``; stored in 16 bits, ``w + u`` rounds back to ``w``
whenever ``|u|`` is below half an ulp of ``w`` (bf16: ``|u| < 2**-9 |w|``). Such a lost update is invisible
in the loss for a while; it shows as ``new == old`` although ``u != 0``.

The true ``u`` of an arbitrary optimizer is not visible, so :func:`update_mask` uses a proxy for "``u`` is
non-zero" that is exact for SGD (with or without momentum, coupled weight decay), Adam/AdamW and
Adagrad/RMSprop-like rules: the gradient at the step is non-zero and finite, or the optimizer's state after
the step holds a non-zero ``exp_avg`` (Adam family: ``u = lr * m / (sqrt(v) + eps)``) or ``momentum_buffer``
(SGD), or the group's ``weight_decay`` is positive and the weight non-zero. Limits: an optimizer whose update
can vanish for a non-zero gradient (sign-based rules at exactly zero, trust-ratio clipping to 0, ``lr=0``
groups, which are left out) or that moves weights with a zero gradient and none of these states (e.g. a
custom rule) is counted by the gradient alone; a ``u`` that itself underflows to 0 inside the optimizer's
16-bit arithmetic counts as lost, as it should.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

STATE_KEYS = ("exp_avg", "momentum_buffer")


@torch.no_grad()
def update_mask(grad: Tensor | None, state: Mapping[str, Any], old: Tensor, weight_decay: float = 0.0) -> Tensor:
    """Elements whose exact update is non-zero (the proxy of the module docstring), as a bool tensor.

    ``grad``: the gradient the step used (``None``: none); ``state``: the optimizer's state for the parameter
    after the step; ``old``: the weight before the step.
    """
    mask = torch.zeros(old.shape, dtype=torch.bool, device=old.device)
    if grad is not None and not grad.is_sparse:
        mask |= (grad != 0) & torch.isfinite(grad)
    for key in STATE_KEYS:
        buf = state.get(key)
        if isinstance(buf, Tensor) and buf.shape == old.shape:
            mask |= buf != 0
    if weight_decay > 0:
        mask |= old != 0
    return mask


@torch.no_grad()
def lost_counts(old: Tensor, new: Tensor, moving: Tensor) -> tuple[int, int]:
    """``(lost, moving)``: elements with ``new == old`` among ``moving``, and the number of ``moving``."""
    return int(((new == old) & moving).sum()), int(moving.sum())


@torch.no_grad()
def any_nonfinite(tensors: Iterable[Tensor | None]) -> bool:
    """True if any (dense) tensor holds an inf or nan: a step on such gradients is skipped by a loss scaler."""
    flags = [~torch.isfinite(t).all() for t in tensors if t is not None and not t.is_sparse]
    return bool(torch.stack([f.cpu() for f in flags]).any()) if flags else False


def running_stat_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module for every module keeping running statistics (BatchNorm, SyncBatchNorm and InstanceNorm
    with ``track_running_stats=True``): a tensor ``running_mean`` and ``running_var``."""
    return {name: m for name, m in model.named_modules()
            if getattr(m, "track_running_stats", False) and isinstance(getattr(m, "running_mean", None), Tensor)
            and isinstance(getattr(m, "running_var", None), Tensor)}


class RunningStatsProbe:
    """Which running statistics did not change across one training step in which their module ran.

    ``before()`` copies ``running_mean``/``running_var`` and ``num_batches_tracked``; ``after()`` returns, per
    module whose ``num_batches_tracked`` advanced (it ran in training mode on an input), ``(unchanged,
    total)`` over the entries of both buffers. Modules without ``num_batches_tracked`` count if in training mode.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self._before: dict[str, tuple[Tensor, Tensor, int | None]] = {}

    @torch.no_grad()
    def before(self) -> None:
        self._before = {}
        for name, m in self.modules.items():
            tracked = getattr(m, "num_batches_tracked", None)
            count = int(tracked) if isinstance(tracked, Tensor) else None
            self._before[name] = (m.running_mean.detach().clone(), m.running_var.detach().clone(), count)

    @torch.no_grad()
    def after(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for name, (mean, var, count) in self._before.items():
            m = self.modules[name]
            tracked = getattr(m, "num_batches_tracked", None)
            ran = int(tracked) > count if isinstance(tracked, Tensor) and count is not None else m.training
            if not ran or m.running_mean.shape != mean.shape:
                continue
            unchanged = int((m.running_mean == mean).sum()) + int((m.running_var == var).sum())
            out[name] = (unchanged, mean.numel() + var.numel())
        self._before = {}
        return out


def buffer_dtype(module: nn.Module) -> str:
    """The dtype name of a norm module's ``running_mean`` (``"bfloat16"``)."""
    return str(module.running_mean.dtype).removeprefix("torch.")


class UpdateProbe:
    """Lost updates across one optimizer step, per ``(layer, parameter name)``.

    ``before(optimizer)`` (after backward, before ``optimizer.step()``) copies the watched parameters of the
    optimizer's groups with a non-zero ``lr`` and their gradient masks; ``after()`` compares and returns
    ``{layer: {param: (lost, moving)}}``, or ``None`` when the step was skipped: a gradient of the optimizer was
    non-finite (a loss scaler skips such a step; without one the weights turn non-finite, nothing to count), or
    no watched weight changed at all and ``scale_dropped`` says the loss scaler backed off.
    """

    def __init__(self, layers: Mapping[str, Mapping[str, Tensor]]) -> None:
        self.layers = {layer: dict(params) for layer, params in layers.items()}
        self._watched = {id(p) for params in self.layers.values() for p in params.values()}
        self._old: dict[int, tuple[Tensor, Tensor, float, Mapping[str, Any]]] = {}
        self._nonfinite = False

    @property
    def armed(self) -> bool:
        """True between ``before`` and ``after``."""
        return bool(self._old) or self._nonfinite

    @torch.no_grad()
    def before(self, optimizer: Any) -> None:
        groups = getattr(optimizer, "param_groups", [])
        every = [p for g in groups for p in g["params"]]
        self._nonfinite |= any_nonfinite(p.grad for p in every)
        for group in groups:
            if not group.get("lr", 1.0):
                continue
            decay = float(group.get("weight_decay", 0.0) or 0.0)
            for p in group["params"]:
                if id(p) in self._watched and id(p) not in self._old:
                    g = p.grad
                    mask = (g != 0) & torch.isfinite(g) if g is not None and not g.is_sparse else None
                    self._old[id(p)] = (p.detach().clone(), mask, decay, optimizer.state)

    @torch.no_grad()
    def after(self, scale_dropped: bool = False) -> dict[str, dict[str, tuple[int, int]]] | None:
        old, nonfinite = self._old, self._nonfinite
        self._old, self._nonfinite = {}, False
        if nonfinite:
            return None
        out: dict[str, dict[str, tuple[int, int]]] = {}
        changed = False
        for layer, params in self.layers.items():
            for name, p in params.items():
                if id(p) not in old:
                    continue
                before, grad_mask, decay, states = old[id(p)]
                state = states.get(p, {}) if hasattr(states, "get") else {}
                moving = update_mask(None, state, before, decay)
                if grad_mask is not None:
                    moving |= grad_mask
                lost, total = lost_counts(before, p.detach(), moving)
                changed = changed or not torch.equal(before, p.detach())
                out.setdefault(layer, {})[name] = (lost, total)
        if scale_dropped and not changed:
            return None
        return out
