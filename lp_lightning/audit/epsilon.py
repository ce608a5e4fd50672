"""Optimizer epsilon safety in low precision (pure torch, no Lightning).

Where eps goes. Every adaptive torch optimizer divides by a denominator built from an accumulator of
squared gradients ``v`` held in the state's dtype, and eps keeps that denominator away from zero:

* ``sqrt_denominator`` -- ``m / (sqrt(v_hat) + eps)``: Adam, AdamW, NAdam, RAdam, SparseAdam (``exp_avg`` /
  ``exp_avg_sq``, or ``max_exp_avg_sq`` with amsgrad), RMSprop (``square_avg``), Adagrad (``sum``);
* ``inside_sqrt`` -- ``g * sqrt(d + eps) / sqrt(v + eps)``: Adadelta (``square_avg`` / ``acc_delta``);
  eps is in squared units;
* ``grad_floor`` -- ``m / u`` with ``u = max(beta2 * u, |g| + eps)``: Adamax (``exp_avg`` / ``exp_inf``).

The rule, from ``torch.finfo(dtype)``: write ``tiny`` for the smallest normal number and
``sub = tiny * finfo.eps`` for the smallest subnormal (fp16: tiny = 2^-14 ~ 6.1e-5, sub = 2^-24 ~ 6.0e-8;
bf16: 2^-126 and 2^-133; fp32: 2^-126 and 2^-149).

1. eps is *lost* when it rounds to 0 (``eps < sub / 2``: fp16 and Adam's default 1e-8) or to a subnormal
   (``eps < tiny``: only a few significant bits survive). The denominator add happens in the state's
   dtype, so a lost eps gives ``m / 0 = inf`` as soon as an entry of ``v`` is 0.
2. Squared-gradient underflow: ``g * g`` rounds to 0 when ``|g| <= sqrt(sub / 2)`` (fp16: ~1.7e-4), so
   ``v`` stays 0 for small gradients while ``m`` does not, and the step becomes ``m / eps``. Keeping that
   step at most ~1 (Adam's normal scale, ``|m| / sqrt(v) <= 1``) for every such gradient needs
   ``eps >= sqrt(sub / 2)``. The smallest safe eps for ``sqrt_denominator`` is therefore
   ``max(tiny, 2^ceil(log2(sqrt(sub / 2))))``: fp16 2^-12 ~ 2.44e-4, bf16 2^-67 ~ 6.8e-21, fp32 2^-75
   ~ 2.6e-23 (a power of two, exact in every float dtype). Default eps values are safe in bf16 and fp32.
3. ``inside_sqrt`` floors the denominator at ``sqrt(eps)``, and ``grad_floor`` never squares; for both
   the safe eps is ``tiny`` (eps must stay a normal number, point 1).

``(1 - beta2) * g * g`` underflows even earlier; the run-time statistics (``moment_stats``) measure how
many entries are actually hit. SGD, ASGD, Rprop and LBFGS have no eps ("no_eps"); any other optimizer
is reported "unchecked", never passed silently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

PLACEMENTS = ("sqrt_denominator", "inside_sqrt", "grad_floor")
FLAGGED = ("zero", "subnormal", "below_safe")  # statuses an EpsilonGuard acts on


@dataclass(frozen=True)
class EpsSpec:
    """Where an optimizer puts eps and what its state tensors are called."""

    placement: str
    second: str  # accumulator in the denominator
    first: str | None  # first moment; None: the gradient plays that role
    bias_corrected: bool = False  # v_hat = v / (1 - beta2**step)


_ADAM = EpsSpec("sqrt_denominator", "exp_avg_sq", "exp_avg", bias_corrected=True)
EPS_OPTIMIZERS: dict[type[torch.optim.Optimizer], EpsSpec] = {
    torch.optim.Adam: _ADAM,
    torch.optim.AdamW: _ADAM,
    torch.optim.NAdam: _ADAM,
    torch.optim.RAdam: _ADAM,
    torch.optim.SparseAdam: _ADAM,
    torch.optim.Adamax: EpsSpec("grad_floor", "exp_inf", "exp_avg"),
    torch.optim.RMSprop: EpsSpec("sqrt_denominator", "square_avg", "momentum_buffer"),
    torch.optim.Adagrad: EpsSpec("sqrt_denominator", "sum", None),
    torch.optim.Adadelta: EpsSpec("inside_sqrt", "square_avg", None),
}
NO_EPS_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.ASGD, torch.optim.Rprop, torch.optim.LBFGS)


class UnsafeEpsilonError(ValueError):
    """An optimizer's eps is lost or below the safe value for the dtype of its parameters/state."""


@dataclass(frozen=True)
class EpsCheck:
    """Verdict for one (param group, dtype) of one optimizer.

    status: "ok" | "zero" | "subnormal" | "below_safe" (see module docstring) | "no_eps" | "unchecked".
    """

    optimizer: str
    group: int
    dtype: torch.dtype | None
    eps: float | None
    eps_in_dtype: float | None
    safe_eps: float | None
    status: str
    n_params: int

    @property
    def lost(self) -> bool:
        """eps rounds to 0 or to a subnormal in ``dtype``."""
        return self.status in ("zero", "subnormal")

    @property
    def flagged(self) -> bool:
        return self.status in FLAGGED

    def describe(self) -> str:
        if self.status == "no_eps":
            return f"{self.optimizer}: no eps, nothing to check"
        if self.status == "unchecked":
            return f"{self.optimizer} param group {self.group}: optimizer not known to the epsilon check (unchecked)"
        what = {"ok": "is safe", "zero": "rounds to 0", "subnormal": f"rounds to the subnormal {self.eps_in_dtype:.3g}",
                "below_safe": "is below the safe value"}[self.status]
        return (f"{self.optimizer} param group {self.group}: eps={self.eps:.3g} {what} in {_name(self.dtype)} "
                f"(safe eps >= {self.safe_eps:.3g})")


def _name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")


def subnormal_min(dtype: torch.dtype) -> float:
    """Smallest positive subnormal of a float dtype (``tiny * eps``)."""
    info = torch.finfo(dtype)
    return info.tiny * info.eps


def safe_eps(dtype: torch.dtype, placement: str = "sqrt_denominator") -> float:
    """Smallest eps that is safe in ``dtype`` for an optimizer with this eps ``placement``."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r} is unknown; allowed: {list(PLACEMENTS)}")
    tiny = torch.finfo(dtype).tiny
    if placement != "sqrt_denominator":
        return tiny
    return max(tiny, 2.0 ** math.ceil(math.log2(math.sqrt(subnormal_min(dtype) / 2))))


def round_to(value: float, dtype: torch.dtype) -> float:
    """``value`` as stored in ``dtype`` (round to nearest even)."""
    return float(torch.tensor(value, dtype=torch.float64).to(dtype).item())


def eps_status(eps: float, dtype: torch.dtype, placement: str = "sqrt_denominator") -> str:
    """"zero", "subnormal", "below_safe" or "ok" for ``eps`` held in ``dtype``."""
    stored = round_to(eps, dtype)
    if stored == 0.0:
        return "zero"
    if stored < torch.finfo(dtype).tiny:
        return "subnormal"
    return "below_safe" if eps < safe_eps(dtype, placement) else "ok"


def optimizer_spec(optimizer: torch.optim.Optimizer) -> EpsSpec | None:
    """The eps spec of a known optimizer class (exact class: a subclass may change the math)."""
    return EPS_OPTIMIZERS.get(type(optimizer))


def _param_dtype(optimizer: torch.optim.Optimizer, p: Tensor, spec: EpsSpec) -> torch.dtype:
    state = optimizer.state.get(p, {})
    acc = state.get(spec.second)
    return acc.dtype if isinstance(acc, Tensor) and acc.is_floating_point() else p.dtype


def check_optimizer(optimizer: torch.optim.Optimizer, name: str | None = None) -> list[EpsCheck]:
    """One ``EpsCheck`` per (param group, dtype of its state or, before the first step, its params)."""
    name = name or type(optimizer).__name__
    spec = optimizer_spec(optimizer)
    if spec is None:
        if isinstance(optimizer, NO_EPS_OPTIMIZERS) and not any("eps" in g for g in optimizer.param_groups):
            return [EpsCheck(name, -1, None, None, None, None, "no_eps", 0)]
        return [EpsCheck(name, i, None, _float(g.get("eps")), None, None, "unchecked", len(g["params"]))
                for i, g in enumerate(optimizer.param_groups)]
    checks = []
    for i, group in enumerate(optimizer.param_groups):
        eps = _float(group.get("eps"))
        dtypes: dict[torch.dtype, int] = {}
        for p in group["params"]:
            dt = _param_dtype(optimizer, p, spec)
            dtypes[dt] = dtypes.get(dt, 0) + 1
        for dt, count in dtypes.items():
            if eps is None or not dt.is_floating_point:
                checks.append(EpsCheck(name, i, dt, eps, None, None, "unchecked", count))
                continue
            safe = safe_eps(dt, spec.placement)
            checks.append(EpsCheck(name, i, dt, eps, round_to(eps, dt), safe, eps_status(eps, dt, spec.placement),
                                   count))
    return checks


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def fix_optimizer(optimizer: torch.optim.Optimizer, checks: Sequence[EpsCheck] | None = None) -> list[EpsCheck]:
    """Raise each flagged group's eps to its safe value (the largest over its dtypes); return what changed.

    The optimizer's default eps is raised as well, so a param group added later starts from a safe one.
    """
    checks = check_optimizer(optimizer) if checks is None else checks
    changed = []
    for i, group in enumerate(optimizer.param_groups):
        flagged = [c for c in checks if c.group == i and c.flagged]
        if flagged:
            group["eps"] = max(c.safe_eps for c in flagged if c.safe_eps is not None)
            changed.extend(flagged)
            default = _float(optimizer.defaults.get("eps"))
            if default is not None and default < group["eps"]:
                optimizer.defaults["eps"] = group["eps"]
    return changed


def _accumulator_parts(optimizer: torch.optim.Optimizer, spec: EpsSpec, group: dict,
                       p: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """(first, second-part S of the denominator ``S + eps``, eps as stored) in fp32, or None before step 1."""
    state = optimizer.state.get(p, {})
    second = state.get("max_exp_avg_sq", state.get(spec.second)) if spec.bias_corrected else state.get(spec.second)
    first = state.get(spec.first) if spec.first else None
    first = p.grad if first is None else first
    if not isinstance(second, Tensor) or first is None or second.is_sparse or first.is_sparse:
        return None
    eps = torch.tensor(group["eps"], dtype=second.dtype).float()
    v = second.detach().float()
    if spec.placement == "grad_floor":
        part = v - eps
    elif spec.placement == "inside_sqrt":
        part = v
    else:
        if spec.bias_corrected and "step" in state:
            step = float(state["step"])
            v = v / max(1.0 - group["betas"][1] ** step, 1e-30)
        part = v.sqrt()
    return first.detach().float(), part, eps


@torch.no_grad()
def moment_stats(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Run-time health of a known optimizer's state (empty dict if unknown or before the first step).

    ``v_zero_share``: share of entries whose second moment is exactly 0 while the first moment (or the
    gradient) is not -- squared-gradient underflow. ``eps_dominated_share``: share of entries whose
    denominator ``S + eps`` has ``S <= eps``, i.e. the step is set by eps rather than by the gradients.
    """
    spec = optimizer_spec(optimizer)
    if spec is None:
        return {}
    zero = nonzero_first = dominated = total = 0
    for group in optimizer.param_groups:
        if _float(group.get("eps")) is None:
            continue
        for p in group["params"]:
            parts = _accumulator_parts(optimizer, spec, group, p)
            if parts is None:
                continue
            first, part, eps = parts
            moving = first != 0
            zero += int((moving & (part == 0)).sum())
            nonzero_first += int(moving.sum())
            dominated += int((part <= eps).sum())
            total += part.numel()
    if total == 0:
        return {}
    return {"v_zero_share": zero / max(nonzero_first, 1), "eps_dominated_share": dominated / total}


def snapshot(params: Iterable[Tensor]) -> list[Tensor]:
    """Detached copies of ``params`` (to measure the next update)."""
    return [p.detach().clone() for p in params]


@torch.no_grad()
def max_update_ratio(optimizer: torch.optim.Optimizer, before: Sequence[Tensor]) -> float:
    """Largest ``|p_after - p_before| / lr`` over all parameters (inf if a parameter became non-finite).

    ``before`` is ``snapshot`` of the optimizer's params in param-group order.
    """
    worst = 0.0
    it = iter(before)
    for group in optimizer.param_groups:
        lr = float(group.get("lr", 0.0) or 0.0)
        for p in group["params"]:
            old = next(it)
            delta = (p.detach().float() - old.float()).abs()
            if delta.numel() == 0:
                continue
            if not torch.isfinite(delta).all():
                return math.inf
            if lr > 0:
                worst = max(worst, float(delta.max()) / lr)
    return worst


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The optimizer's parameters in param-group order."""
    return [p for g in optimizer.param_groups for p in g["params"]]
