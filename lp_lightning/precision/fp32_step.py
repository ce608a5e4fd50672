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

from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import LBFGS, Optimizer, SparseAdam

from lp_lightning.precision.rounding import Noise
from lp_lightning.precision.stand_ins import StandIns

UPDATES = ("nearest", "stochastic", "kahan")
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
        self._generators: dict[str, Noise] = {}
        self._pending: dict[str, Any] = {}  # generator states loaded before the generator existed

    # ------------------------------------------------------------------ the step
    def step(self, optimizer: Any, **kwargs: Any) -> Any:
        """``optimizer.step(**kwargs)`` (gradients already computed), compensated unless ``update="nearest"``."""
        if self.update == "nearest":
            return optimizer.step(**kwargs)
        opt = check_optimizer(getattr(optimizer, "_optimizer", optimizer), self.update)
        picks: dict[torch.device, list[tuple[dict[str, Any], int]]] = {}
        for group in opt.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is not None and p.dtype == self.dtype and not p.grad.is_sparse:
                    picks.setdefault(p.device, []).append((group, i))
        stand_ins = [StandIns(opt, items, self.update, self.dtype) for items in picks.values()]
        try:
            result = optimizer.step(**kwargs)
        except BaseException:
            for s in stand_ins:
                s.undo(opt)
            raise
        with torch.no_grad():
            for s in stand_ins:
                s.write_back(opt, self.generator(s.flat.device))
        return result

    # ------------------------------------------------------------------ the random stream
    def generator(self, device: torch.device) -> Noise:
        """The random source for ``device``, seeded from rank 0's seed on every rank and restored from a
        checkpoint: numpy's SFC64 on CPU (half the cost of torch's CPU generator per random bit), a
        ``torch.Generator`` elsewhere."""
        key = str(device)
        if key not in self._generators:
            if self.seed is None:
                self.seed = _shared_seed()
            gen: Noise
            if device.type == "cpu":
                gen = np.random.SFC64(self.seed)
            else:
                gen = torch.Generator(device=device)
                gen.manual_seed(self.seed)
            self._generators[key] = gen
            if key in self._pending:
                _set_state(gen, self._pending.pop(key))
        return self._generators[key]

    def state_dict(self) -> dict[str, Any]:
        if self.update == "nearest":
            return {}
        states = {key: _get_state(gen) for key, gen in self._generators.items()}
        states.update(self._pending)
        return {"rounding_seed": self.seed, "rounding_generators": states} if self.seed is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rounding_generators" not in state:
            return
        self.seed = state["rounding_seed"]
        for key, gen_state in state["rounding_generators"].items():
            if key in self._generators:
                _set_state(self._generators[key], gen_state)
            else:
                self._pending[key] = gen_state


def _get_state(gen: Noise) -> Any:
    """A checkpointable state (plain ints for numpy, so ``torch.load(weights_only=True)`` reads it)."""
    if isinstance(gen, torch.Generator):
        return gen.get_state()
    state = gen.state
    return {**state, "state": {k: [int(x) for x in v] for k, v in state["state"].items()}}


def _set_state(gen: Noise, state: Any) -> None:
    if isinstance(gen, torch.Generator) and isinstance(state, torch.Tensor):
        gen.set_state(state)
    elif isinstance(gen, np.random.BitGenerator) and isinstance(state, dict) \
            and state.get("bit_generator") == type(gen).__name__:
        gen.state = {**state, "state": {k: np.asarray(v, dtype=np.uint64) for k, v in state["state"].items()}}
    else:
        rank_zero_warn("PureHalfPrecision: the checkpoint's rounding stream was saved by another version or "
                       "device; it starts afresh from the saved seed (the run resumes, not bit for bit)")


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


def _shared_seed() -> int:
    """A seed from the user's torch seed, broadcast from rank 0 so every DDP rank draws the same stream."""
    seed = [int(torch.initial_seed()) % 2**63]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(seed, src=0)
    return seed[0]
