"""The optimizer step of pure 16-bit training run in fp32 and written back with compensated rounding.

Works with any ``torch.optim.Optimizer`` that keeps its per-parameter tensors in ``optimizer.state[p]``:
for the step, each 16-bit parameter is replaced in its param group by an fp32 stand-in (its value plus its
Kahan compensation) with an fp32 gradient and fp32 copies of its 16-bit state; the step runs in fp32; then
the results are written back into the original 16-bit parameters and state tensors (``copy_``: storage
identity, DDP's hooks and bucket views and references to the state stay valid) with

- ``"stochastic"``: parameters and state rounded stochastically (unbiased);
- ``"kahan"``: parameters rounded to nearest, the dropped part kept in a 16-bit compensation buffer
  (``optimizer.state[p]["lp_kahan_comp"]``, so it is in the optimizer's checkpoint) and added back before the
  next step; the state rounded stochastically.

The random stream comes from the step's own generators (the user's RNG is untouched), seeded identically on
every DDP rank (so the parameters stay equal) and saved with the plugin's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import LBFGS, Optimizer, SparseAdam

from lp_lightning.precision.rounding import kahan_round, stochastic_round

UPDATES = ("nearest", "stochastic", "kahan")
KAHAN_KEY = "lp_kahan_comp"
_REFUSED = {LBFGS: "it re-evaluates the closure inside step()", SparseAdam: "it steps sparse gradients"}


def check_update(update: str) -> str:
    """``update`` if allowed, else ValueError naming the allowed values (``"auto"`` is resolved by the plugin)."""
    if update not in UPDATES:
        raise ValueError(f"update={update!r} is not supported; allowed: {['auto', *UPDATES]}")
    return update


class Fp32Step:
    """Runs ``optimizer.step()`` on fp32 copies and rounds the results back into the 16-bit tensors."""

    def __init__(self, update: str, dtype: torch.dtype) -> None:
        self.update = check_update(update)
        self.dtype = dtype
        self.seed: int | None = None
        self._generators: dict[str, torch.Generator] = {}
        self._pending: dict[str, Tensor] = {}  # generator states loaded before the generator existed

    # ------------------------------------------------------------------ the step
    def step(self, optimizer: Any, **kwargs: Any) -> Any:
        """``optimizer.step(**kwargs)`` (gradients already computed), compensated unless ``update="nearest"``."""
        if self.update == "nearest":
            return optimizer.step(**kwargs)
        opt = check_optimizer(getattr(optimizer, "_optimizer", optimizer), self.update)
        swaps = [self._stand_in(opt, group, i) for group in opt.param_groups for i, p in enumerate(group["params"])
                 if p.grad is not None and p.dtype == self.dtype and not p.grad.is_sparse]
        try:
            result = optimizer.step(**kwargs)
        except BaseException:
            for swap in swaps:
                swap.undo(opt)
            raise
        jobs: list[tuple[Tensor, Tensor]] = []  # (16-bit destination, fp32 value) to round stochastically
        for swap in swaps:
            jobs += self._write_back(opt, swap)
        with torch.no_grad():
            self._round_into(jobs)
        return result

    def _stand_in(self, opt: Optimizer, group: dict[str, Any], index: int) -> _Swap:
        """Put an fp32 leaf with an fp32 gradient and fp32 state in place of ``group["params"][index]``."""
        p = group["params"][index]
        state = opt.state.pop(p, None) if p in opt.state else None
        full = p.detach().float()
        comp = state.get(KAHAN_KEY) if state else None
        if comp is not None and self.update == "kahan":
            full.add_(comp.float())
        q = nn.Parameter(full, requires_grad=p.requires_grad)
        q.grad = p.grad.detach().float()
        if state:
            opt.state[q] = {k: v.float() if _per_param(k, v, p) and v.dtype == self.dtype else v
                            for k, v in state.items() if k != KAHAN_KEY}
        group["params"][index] = q
        return _Swap(group, index, p, q, state)

    def _write_back(self, opt: Optimizer, swap: _Swap) -> list[tuple[Tensor, Tensor]]:
        """Put the parameter and its state back (16-bit); return what is still to be rounded into them."""
        p, q = swap.param, swap.stand_in
        new = opt.state.pop(q, {})
        swap.undo(opt)
        if q.dtype != torch.float32 or q.shape != p.shape:
            raise TypeError(f"{type(opt).__name__}.step replaced the parameter's .data; PureHalfPrecision(update="
                            f"{self.update!r}) needs an optimizer that updates it in place. Pass update='nearest' "
                            "or use a torch.optim optimizer")
        old = swap.state or {}
        state: dict[str, Any] = {}
        jobs = []
        if self.update == "kahan":
            with torch.no_grad():
                low, comp = kahan_round(q.detach(), self.dtype)
                p.copy_(low)
            kept = old.get(KAHAN_KEY)
            state[KAHAN_KEY] = kept.copy_(comp) if isinstance(kept, Tensor) and kept.shape == p.shape else comp
        else:
            jobs.append((p.detach(), q.detach()))
        for key, value in new.items():
            if not _per_param(key, value, p) or value.dtype != torch.float32:
                state[key] = value
                continue
            kept = old.get(key)  # the original 16-bit storage: references to it stay valid
            usable = isinstance(kept, Tensor) and kept.dtype == self.dtype and kept.shape == p.shape
            state[key] = kept if usable else torch.empty_like(value, dtype=self.dtype)
            jobs.append((state[key], value))
        if state:
            opt.state[p] = state
        return jobs

    def _round_into(self, jobs: list[tuple[Tensor, Tensor]], chunk: int = 1 << 20) -> None:
        """Round each fp32 value stochastically into its 16-bit destination: many small tensors in one call
        (per device, ~``chunk`` elements at a time), since per-tensor overhead dominates small layers."""
        by_device: dict[torch.device, list[tuple[Tensor, Tensor]]] = {}
        for dst, value in jobs:
            by_device.setdefault(value.device, []).append((dst, value))
        for device, items in by_device.items():
            gen = self.generator(device)
            start = 0
            while start < len(items):
                stop, size = start, 0
                while stop < len(items) and (stop == start or size + items[stop][1].numel() <= chunk):
                    size += items[stop][1].numel()
                    stop += 1
                batch = items[start:stop]
                flat = torch.cat([value.reshape(-1) for _, value in batch])
                rounded = stochastic_round(flat, self.dtype, gen).split([value.numel() for _, value in batch])
                dsts = [dst for dst, _ in batch]
                torch._foreach_copy_(dsts, [r.view(d.shape) for d, r in zip(dsts, rounded, strict=True)])
                start = stop

    # ------------------------------------------------------------------ the random stream
    def generator(self, device: torch.device) -> torch.Generator:
        """The generator for ``device``: seeded from rank 0's seed on every rank, restored from a checkpoint."""
        key = str(device)
        if key not in self._generators:
            if self.seed is None:
                self.seed = _shared_seed()
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if key in self._pending:
                gen.set_state(self._pending.pop(key))
            self._generators[key] = gen
        return self._generators[key]

    def state_dict(self) -> dict[str, Any]:
        if self.update == "nearest":
            return {}
        states = {key: gen.get_state() for key, gen in self._generators.items()}
        states.update(self._pending)
        return {"rounding_seed": self.seed, "rounding_generators": states} if self.seed is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rounding_generators" not in state:
            return
        self.seed = state["rounding_seed"]
        for key, gen_state in state["rounding_generators"].items():
            if key in self._generators:
                self._generators[key].set_state(gen_state)
            else:
                self._pending[key] = gen_state


def check_optimizer(optimizer: Any, update: str) -> Optimizer:
    """``optimizer`` if the fp32 step can drive it, else TypeError naming its class and the fix."""
    fix = ("Pass PureHalfPrecision(update='nearest') (plain round-to-nearest 16-bit updates; small updates are "
           "lost) or use SGD, Adam, AdamW or another torch.optim optimizer")
    name = type(optimizer).__name__
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"PureHalfPrecision(update={update!r}) steps a torch.optim.Optimizer; got {name}. {fix}")
    for cls, why in _REFUSED.items():
        if isinstance(optimizer, cls):
            raise TypeError(f"PureHalfPrecision(update={update!r}) does not support {name}: {why}. {fix}")
    if not getattr(optimizer, "_lp_checked", False):
        optimizer._lp_checked = True  # type: ignore[attr-defined]
        if not type(optimizer).__module__.startswith(("torch.optim", "optimi")):
            rank_zero_warn(f"PureHalfPrecision(update={update!r}) runs {name}.step on fp32 copies of the parameters, "
                           "gradients and the per-parameter tensors in optimizer.state; tensors it keeps elsewhere "
                           f"stay as they are. If {name} keeps its own copies, pass update='nearest'.")
    return optimizer


def _per_param(key: str, value: Any, p: Tensor) -> bool:
    """A floating state tensor shaped like its parameter (not the compensation, not a step counter)."""
    return key not in (KAHAN_KEY, "step") and isinstance(value, Tensor) and value.is_floating_point() \
        and value.shape == p.shape


@dataclass
class _Swap:
    """A parameter and its fp32 stand-in during the step (the parameter itself is never re-bound: changing a
    tensor's dtype through ``.data`` would drop its gradient accumulator, and DDP's hooks with it)."""

    group: dict[str, Any]
    index: int
    param: Tensor
    stand_in: Tensor
    state: dict[str, Any] | None

    def undo(self, opt: Optimizer) -> None:
        self.group["params"][self.index] = self.param
        opt.state.pop(self.stand_in, None)
        if self.state is not None:
            opt.state[self.param] = self.state


def _shared_seed() -> int:
    """A seed from the user's torch seed, broadcast from rank 0 so every DDP rank draws the same stream."""
    seed = [int(torch.initial_seed()) % 2**63]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(seed, src=0)
    return seed[0]
