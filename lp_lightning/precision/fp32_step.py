"""The optimizer step of pure 16-bit training run in fp32 and written back with compensated rounding.

Works with any ``torch.optim.Optimizer`` that keeps its per-parameter tensors in ``optimizer.state[p]``:
for the step, each 16-bit parameter temporarily gets an fp32 ``.data`` (plus its Kahan compensation), an
fp32 ``.grad`` and fp32 copies of its 16-bit state; the step runs in fp32; then the results are written back
into the original 16-bit storages (``copy_``: storage identity, DDP bucket views and optimizer references stay
valid) with

- ``"stochastic"``: parameters and state rounded stochastically (unbiased);
- ``"kahan"``: parameters rounded to nearest, the dropped part kept in a 16-bit compensation buffer
  (``optimizer.state[p]["lp_kahan_comp"]``, so it is in the optimizer's checkpoint) and added back before the
  next step; the state rounded stochastically.

The random stream comes from the step's own generators (the user's RNG is untouched), seeded identically on
every DDP rank (so the parameters stay equal) and saved with the plugin's state.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import LBFGS, Optimizer, SparseAdam

from lp_lightning.precision.rounding import kahan_round, stochastic_round

UPDATES = ("nearest", "stochastic", "kahan")
KAHAN_KEY = "lp_kahan_comp"
_REFUSED = {LBFGS: "it re-evaluates the closure inside step()", SparseAdam: "it steps sparse gradients"}


def check_update(update: str) -> str:
    """``update`` if allowed, else ValueError naming the allowed values."""
    if update not in UPDATES:
        raise ValueError(f"update={update!r} is not supported; allowed: {list(UPDATES)}")
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
        swapped = [self._to_fp32(opt, p) for group in opt.param_groups for p in group["params"]
                   if p.grad is not None and p.dtype == self.dtype and not p.grad.is_sparse]
        try:
            result = optimizer.step(**kwargs)
        except BaseException:
            for p, data, grad, saved in swapped:
                _restore(opt, p, data, grad, saved)
            raise
        for p, data, grad, saved in swapped:
            self._write_back(opt, p, data, grad, saved)
        return result

    def _to_fp32(self, opt: Optimizer, p: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        data, grad = p.data, p.grad
        full = data.float()
        state = opt.state.get(p, {})
        comp = state.get(KAHAN_KEY)
        if comp is not None and self.update == "kahan":
            full.add_(comp.float())
        saved = {}
        for key, value in list(state.items()):
            if _per_param(key, value, p) and value.dtype == self.dtype:
                saved[key] = value
                state[key] = value.float()
        p.data = full
        p.grad = grad.float()
        return p, data, grad, saved

    def _write_back(self, opt: Optimizer, p: Tensor, data: Tensor, grad: Tensor, saved: dict[str, Tensor]) -> None:
        full = p.data
        if full.dtype != torch.float32 or full.shape != data.shape:
            _restore(opt, p, data, grad, saved)
            raise TypeError(f"{type(opt).__name__}.step replaced the parameter's .data; PureHalfPrecision(update="
                            f"{self.update!r}) needs an optimizer that updates it in place. Pass update='nearest' "
                            "or use a torch.optim optimizer")
        gen = self.generator(full.device)
        if self.update == "kahan":
            low, comp = kahan_round(full, self.dtype)
            data.copy_(low)
            state = opt.state[p]
            if isinstance(state.get(KAHAN_KEY), Tensor) and state[KAHAN_KEY].shape == data.shape:
                state[KAHAN_KEY].copy_(comp)
            else:
                state[KAHAN_KEY] = comp
        else:
            data.copy_(stochastic_round(full, self.dtype, gen))
        p.data = data
        p.grad = grad
        state = opt.state[p]
        for key, value in list(state.items()):
            if not _per_param(key, value, p) or value.dtype != torch.float32:
                continue
            if key in saved:
                saved[key].copy_(stochastic_round(value, self.dtype, gen))
                state[key] = saved[key]
            else:  # created by this step (the first one): 16-bit from now on
                state[key] = stochastic_round(value, self.dtype, gen)

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


def _restore(opt: Optimizer, p: Tensor, data: Tensor, grad: Tensor, saved: dict[str, Tensor]) -> None:
    p.data = data
    p.grad = grad
    if p in opt.state:
        opt.state[p].update(saved)


def _shared_seed() -> int:
    """A seed from the user's torch seed, broadcast from rank 0 so every DDP rank draws the same stream."""
    seed = [int(torch.initial_seed()) % 2**63]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(seed, src=0)
    return seed[0]
