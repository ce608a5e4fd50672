"""EpsilonGuard: catch an optimizer eps that is lost in the training dtype, before the first step."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lp_lightning.audit.epsilon import (
    EpsCheck,
    UnsafeEpsilonError,
    check_optimizer,
    fix_optimizer,
    max_update_ratio,
    moment_stats,
    optimizer_params,
    snapshot,
)

ACTIONS = ("warn", "raise", "fix")
# Run-time thresholds (documented in docs/safety.md); crossing one warns once per metric.
THRESHOLDS: dict[str, float] = {
    # >95% of moving entries have v == 0: nearly all squared gradients underflow (pure fp16 Adam with a
    # safe eps sits at ~50-80% on digits; those entries step by m / eps, which the safe eps bounds)
    "v_zero_share": 0.95,
    # >95% of denominators are set by eps: Adam has become SGD with momentum at lr / eps
    "eps_dominated_share": 0.95,
    # a safe eps bounds |update| / lr by about 1 / sqrt(1 - beta2) (~32 for beta2 = 0.999) when
    # (1 - beta2) * g^2 underflows; a lost eps gives inf, eps = 1e-5 in fp16 ~550
    "max_update_over_lr": 100.0,
}


class EpsilonGuard(Callback):
    """Check every optimizer's eps against the dtype it is applied in; watch the moments while training.

    Args:
        action: what to do when an eps is lost or below the safe value, before the first optimizer step:
            ``"warn"`` (once), ``"raise"`` (``UnsafeEpsilonError``, weights untouched) or ``"fix"`` (set the
            safe eps, say once what changed).
        check_every_n_steps: every this many optimizer steps, log ``epsilon_guard/v_zero_share``,
            ``epsilon_guard/eps_dominated_share`` and ``epsilon_guard/max_update_over_lr`` (0 disables).
        thresholds: override entries of ``THRESHOLDS``.
    """

    def __init__(self, action: str = "warn", check_every_n_steps: int = 50,
                 thresholds: dict[str, float] | None = None) -> None:
        if action not in ACTIONS:
            raise ValueError(f"action={action!r} is not allowed; choose one of {list(ACTIONS)}")
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int) \
                or check_every_n_steps < 0:
            raise ValueError(f"check_every_n_steps={check_every_n_steps!r} must be an int >= 0")
        unknown = sorted(set(thresholds or {}) - set(THRESHOLDS))
        if unknown:
            raise ValueError(f"thresholds has unknown keys {unknown}; allowed: {sorted(THRESHOLDS)}")
        self.action = action
        self.check_every_n_steps = check_every_n_steps
        self.thresholds = {**THRESHOLDS, **(thresholds or {})}
        self.checks: list[EpsCheck] = []  # the verdicts, per param group, when each group was first checked
        self.changes: list[tuple[EpsCheck, float]] = []  # (flagged check, new eps) made by action="fix"
        self.history: list[dict[str, float]] = []  # run-time statistics, one dict per checked step
        self._checked: dict[int, int] = {}  # id(optimizer) -> number of its param groups checked
        self._warned: set[str] = set()
        self._before: dict[int, list[torch.Tensor]] = {}

    # ---- before the first step -------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # a new fit brings new optimizers: check them again
            self._checked.clear()
            self._before.clear()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for idx, optimizer in enumerate(trainer.optimizers):
            self._check(idx, optimizer)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # unwrap a LightningOptimizer
        idx = _index(trainer, optimizer)
        self._check(idx if idx is not None else len(trainer.optimizers), optimizer)  # new optimizer or group
        if idx is not None and self._due(trainer):  # statistics only for the Trainer's own optimizers
            self._before[idx] = snapshot(optimizer_params(optimizer))

    def _check(self, idx: int, optimizer: torch.optim.Optimizer) -> None:
        """Check the optimizer's param groups not checked yet (all at first; later, groups added since,
        e.g. by ``BackboneFinetuning`` unfreezing a backbone)."""
        seen = self._checked.get(id(optimizer), 0)
        if seen == len(optimizer.param_groups):
            return
        self._checked[id(optimizer)] = len(optimizer.param_groups)
        name = f"optimizer {idx} ({type(optimizer).__name__})"
        checks = [c for c in check_optimizer(optimizer, name) if c.group >= seen or (c.group < 0 and not seen)]
        self.checks.extend(checks)
        for c in checks:
            if c.status in ("no_eps", "unchecked"):
                self._say_once(c.describe() + ("" if c.status == "no_eps" else "; eps safety not verified"),
                               warn=c.status == "unchecked")
        flagged = [c for c in checks if c.flagged]
        if not flagged:
            return
        text = "; ".join(c.describe() for c in flagged)
        if self.action == "raise":
            suggested = _round_up(max(c.safe_eps for c in flagged))
            raise UnsafeEpsilonError(f"EpsilonGuard: {text}. Set a larger eps (e.g. optimizer.eps={suggested}) or "
                                     "use EpsilonGuard(action='fix') (lp-train: callbacks.epsilon_guard.action=fix).")
        if self.action == "warn":
            self._say_once(f"EpsilonGuard: {text}", warn=True)
            return
        changed = fix_optimizer(optimizer, checks)
        for c in changed:
            self.changes.append((c, float(optimizer.param_groups[c.group]["eps"])))
        news = ", ".join(f"group {c.group}: eps {c.eps:.3g} -> {new:.3g} ({_dt(c)})" for c, new in self.changes
                         if c in changed)
        self._say_once(f"EpsilonGuard fixed {name}: {news}", warn=False)

    # ---- during training -------------------------------------------------------------------------
    def _due(self, trainer: L.Trainer) -> bool:
        """Every n-th training step; with several optimizers stepping per batch (manual optimization moves
        ``global_step`` once per optimizer step) all of them are sampled on the same batches."""
        n = self.check_every_n_steps
        return n > 0 and (trainer.global_step // max(1, len(trainer.optimizers))) % n == 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._before:
            return
        metrics: dict[str, float] = {}
        for idx, before in self._before.items():
            optimizer = trainer.optimizers[idx]
            suffix = "" if len(trainer.optimizers) == 1 else f"_{idx}"
            stats = moment_stats(optimizer)
            stats["max_update_over_lr"] = max_update_ratio(optimizer, before)
            metrics.update({f"epsilon_guard/{k}{suffix}": v for k, v in stats.items()})
            for key, value in stats.items():
                if value > self.thresholds[key] or math.isnan(value):
                    self._say_once(f"EpsilonGuard: {key}={value:.3g} for optimizer {idx} at step "
                                   f"{trainer.global_step} exceeds {self.thresholds[key]:g}; "
                                   f"{_ADVICE[key]}", warn=True, key=f"{key}{suffix}")
        self._before.clear()
        self.history.append({"step": float(trainer.global_step), **metrics})
        for logger in trainer.loggers:  # loggers write on rank 0 only; no collective here
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before.clear()

    def _say_once(self, message: str, warn: bool, key: str | None = None) -> None:
        key = key or message
        if key in self._warned:
            return
        self._warned.add(key)
        if warn:
            rank_zero_warn(message)
        else:
            rank_zero_info(message)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


_ADVICE = {
    "v_zero_share": "squared gradients underflow in the state dtype; bfloat16 keeps them",
    "eps_dominated_share": "eps, not the gradients, sets most steps (SGD with momentum at lr / eps)",
    "max_update_over_lr": "updates explode (tiny denominators); raise eps",
}


def _round_up(x: float, digits: int = 3) -> str:
    """``x`` rounded up to ``digits`` significant digits (a suggested eps must not fall below the bound)."""
    text = f"{x:.{digits}g}"
    if float(text) < x:
        step = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
        text = f"{math.ceil(x / step) * step:.{digits}g}"
    return text


def _dt(c: EpsCheck) -> str:
    return str(c.dtype).removeprefix("torch.")


def _index(trainer: L.Trainer, optimizer: torch.optim.Optimizer) -> int | None:
    for i, opt in enumerate(trainer.optimizers):
        if opt is optimizer:
            return i
    return None
