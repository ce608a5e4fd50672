"""fp32 stand-ins for 16-bit parameters, their gradients and their 16-bit optimizer state during one step.

Everything is cut from one flat fp32 buffer per device: one cast in, one rounding pass over the parameters and
state, one copy out, whatever the number of layers (per-tensor overhead dominates small layers). The buffer
lives only inside ``optimizer.step``. The parameters themselves are never re-bound (changing a tensor's dtype
through ``.data`` would drop its gradient accumulator, and DDP's hooks with it): each is swapped out of its
param group for the step and put back, its 16-bit storages written in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lp_lightning.precision.rounding import Noise, kahan_round, stochastic_round_

KAHAN_KEY = "lp_kahan_comp"


def per_param(key: str, value: Any, p: Tensor) -> bool:
    """A floating state tensor shaped like its parameter (not the compensation, not a step counter)."""
    return key not in (KAHAN_KEY, "step") and isinstance(value, Tensor) and value.is_floating_point() \
        and value.shape == p.shape


class StandIns:
    """The fp32 stand-ins of one device's 16-bit parameters (``picks``: (param group, index) pairs)."""

    def __init__(self, opt: Optimizer, picks: list[tuple[dict[str, Any], int]], update: str,
                 dtype: torch.dtype) -> None:
        self.update, self.dtype, self.picks = update, dtype, picks
        params = self.params = [group["params"][i] for group, i in picks]
        states = self.states = [opt.state.pop(p, None) for p in params]
        keys = [[k for k, v in st.items() if per_param(k, v, p) and v.dtype == dtype] if st else []
                for p, st in zip(params, states, strict=True)]
        # parameters, then their state (both rounded back), then gradients (read only)
        sources = [p.detach() for p in params] + [st[k] for st, ks in zip(states, keys, strict=True) for k in ks]
        sources += [p.grad for p in params]
        sizes = [t.numel() for t in sources]
        n = len(params)
        self.param_sizes = sizes[:n]
        self.n_params, self.n_rounded = sum(self.param_sizes), sum(sizes[:-n])
        self.flat = torch.empty(sum(sizes), dtype=torch.float32, device=params[0].device)
        views, offset = [], 0
        for t, size in zip(sources, sizes, strict=True):  # one as_strided each: split + view cost twice as much
            views.append(self.flat.as_strided(t.shape, _contiguous_strides(t.shape), offset))
            offset += size
        torch._foreach_copy_(views, sources)
        self.views = views[:n]
        if update == "kahan":
            comps = [(v, st[KAHAN_KEY]) for v, st in zip(self.views, states, strict=True) if st and KAHAN_KEY in st]
            if comps:
                torch._foreach_add_([v for v, _ in comps], [c for _, c in comps])
        state_views = iter(views[n:-n])
        self.addresses = [v.data_ptr() for v in self.views]  # an optimizer that re-binds ``.data`` moves them
        self.state_views: list[dict[str, Tensor]] = []
        for (group, i), st, ks, q, grad in zip(picks, states, keys, self.views, views[-n:], strict=True):
            q.grad = grad  # the stand-in is the plain fp32 view: torch.optim steps whatever has a .grad
            mine = {k: next(state_views) for k in ks}
            self.state_views.append(mine)
            if st:
                opt.state[q] = {k: mine.get(k, v) for k, v in st.items() if k != KAHAN_KEY}
            group["params"][i] = q

    def undo(self, opt: Optimizer) -> None:
        """Put the 16-bit parameters and their state back as they were."""
        for (group, i), p, q, st in zip(self.picks, self.params, self.views, self.states, strict=True):
            group["params"][i] = p
            opt.state.pop(q, None)
            if st is not None:
                opt.state[p] = st

    def _stepped_in_place(self, old: dict[str, Any], new: dict[str, Any], mine: dict[str, Tensor], p: Tensor) -> bool:
        """Whether the step kept the state's keys and stepped our fp32 views in place (nothing to re-allocate)."""
        kahan = KAHAN_KEY in old
        if (self.update == "kahan") != kahan or len(new) + kahan != len(old):
            return False
        return all(new.get(k) is v for k, v in mine.items()) and all(
            k in old and (k in mine or not per_param(k, v, p) or v.dtype != torch.float32) for k, v in new.items())

    def _shaped_like_params(self, flat: Tensor) -> list[Tensor]:
        """``flat`` (one value per parameter element, in parameter order) as one tensor per parameter."""
        return [t.view(p.shape) for t, p in zip(flat.split(self.param_sizes), self.params, strict=True)]

    def write_back(self, opt: Optimizer, noise: Noise) -> None:
        """Round the stepped fp32 values into the original 16-bit parameter and state storages (references to
        them, DDP's bucket views included, stay valid) and put the parameters back in their groups. Call it
        under ``torch.no_grad()``."""
        new_states = [opt.state.pop(q, {}) for q in self.views]
        self.undo(opt)
        dsts: list[Tensor] = []
        values: list[Tensor] = []
        extra: list[tuple[Tensor, Tensor]] = []  # state the optimizer made (or re-bound) itself during the step
        for p, q, address, old, new, mine in zip(self.params, self.views, self.addresses, self.states,
                                                 new_states, self.state_views, strict=True):
            if q.dtype != torch.float32 or q.shape != p.shape or q.data_ptr() != address:
                raise TypeError(f"{type(opt).__name__}.step replaced the parameter's .data; PureHalfPrecision("
                                f"update={self.update!r}) needs an optimizer that updates it in place. Pass "
                                "update='nearest' or use a torch.optim optimizer")
            if old and mine and self._stepped_in_place(old, new, mine, p):  # the usual case: no new dict, no copies
                for key, value in new.items():
                    if key not in mine:
                        old[key] = value  # e.g. Adam's step counter
                dsts += [old[key] for key in mine]
                values += mine.values()
                continue
            old = old or {}
            state: dict[str, Any] = {}
            for key, value in new.items():
                if not per_param(key, value, p) or value.dtype != torch.float32:
                    state[key] = value
                    continue
                kept = old.get(key)  # the original 16-bit storage: references to it stay valid
                usable = isinstance(kept, Tensor) and kept.dtype == self.dtype and kept.shape == p.shape
                state[key] = kept if usable else torch.empty_like(value, dtype=self.dtype)
                if value is mine.get(key):
                    dsts.append(state[key])
                    values.append(value)
                else:
                    extra.append((state[key], value))
            if self.update == "kahan":
                kept = old.get(KAHAN_KEY)
                state[KAHAN_KEY] = kept if isinstance(kept, Tensor) and kept.shape == p.shape else torch.zeros_like(p)
            if state:
                opt.state[p] = state
        if self.update == "kahan":  # parameters to nearest, the dropped part into the compensation buffers
            low, comp = kahan_round(self.flat[:self.n_params], self.dtype)
            torch._foreach_copy_(self.params, self._shaped_like_params(low))
            torch._foreach_copy_([opt.state[p][KAHAN_KEY] for p in self.params], self._shaped_like_params(comp))
            stochastic_round_(self.flat[self.n_params:self.n_rounded], self.dtype, noise)
        else:
            stochastic_round_(self.flat[:self.n_rounded], self.dtype, noise)
            dsts[:0], values[:0] = self.params, self.views
        if dsts:
            torch._foreach_copy_(dsts, values)  # exact: the values are representable in the 16-bit type
        for dst, value in extra:
            dst.copy_(stochastic_round_(value.detach().float().contiguous(), self.dtype, noise))


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``."""
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))
