"""Accumulates lost-update and stalled-norm-statistics samples into per-layer rows, flags and warning texts
(pure Python/torch, no Lightning; ``NumericsMonitor`` logs and warns with what this returns)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

UPDATE_FIXES = ('a larger learning rate will not fix it (it changes the training, and the smallest updates '
                'still vanish); use PureHalfPrecision(update="stochastic") or update="kahan" (compensated '
                '16-bit updates), or train in float32 or mixed precision (e.g. precision="bf16-mixed")')
NORM_FIXES = ('keep normalization statistics in float32: PureHalfPrecision(norm_stats="float32") (its default), '
              'or train in float32 or mixed precision; Lightning\'s "bf16-true"/"16-true" cast them to 16 bits')


def _share(lost: int, total: int) -> float | None:
    return lost / total if total else None


class UpdateTelemetry:
    """Running totals of lost updates per (layer, parameter) and of unchanged running statistics per module.

    Args:
        lost_update_threshold: a layer is flagged once one of its parameter tensors has lost more than this
            share of its non-zero updates over the counted sampled steps.
        norm_stall_threshold, norm_stall_steps: a norm module is flagged once at least this share of its
            ``running_mean``/``running_var`` entries was unchanged on this many sampled steps in a row.

    ``update_rounding``: how the step writes the 16-bit weights (``"nearest"``; ``"stochastic"``/``"kahan"``
    when the precision plugin compensates). Compensated, ``new == old`` no longer means lost (stochastic rounding
    keeps the update in expectation, Kahan in its buffer): the shares are still measured, no layer is flagged.
    """

    def __init__(self, lost_update_threshold: float = 0.5, norm_stall_threshold: float = 0.1,
                 norm_stall_steps: int = 3) -> None:
        self.lost_update_threshold = lost_update_threshold
        self.norm_stall_threshold = norm_stall_threshold
        self.norm_stall_steps = norm_stall_steps
        self.update_rounding = "nearest"
        self.update_steps: list[int] = []
        self.update_skipped_steps: list[int] = []
        self.updates: dict[str, dict[str, list[int]]] = {}  # layer -> parameter -> [lost, moving]
        self.norm_stats: dict[str, dict[str, Any]] = {}
        self.lost_update_layers: list[str] = []
        self.frozen_norm_stats: list[str] = []

    def add_updates(self, step: int, counts: Mapping[str, Mapping[str, tuple[int, int]]] | None,
                    dtypes: Mapping[str, str]) -> tuple[dict[str, float], str | None]:
        """One sampled optimizer step (``counts`` None: skipped). Returns the step's per-layer lost shares and
        one warning naming every layer flagged for the first time (None if none)."""
        if counts is None:
            self.update_skipped_steps.append(step)
            return {}, None
        self.update_steps.append(step)
        shares: dict[str, float] = {}
        flagged: list[str] = []
        for layer, params in counts.items():
            totals = self.updates.setdefault(layer, {})
            for name, (lost, moving) in params.items():
                acc = totals.setdefault(name, [0, 0])
                acc[0] += lost
                acc[1] += moving
            step_share = _share(sum(c[0] for c in params.values()), sum(c[1] for c in params.values()))
            if step_share is not None:
                shares[layer] = step_share
            if self.update_rounding == "nearest" and layer not in self.lost_update_layers \
                    and self._worst(layer)[1] > self.lost_update_threshold:
                self.lost_update_layers.append(layer)
                flagged.append(self._update_line(layer, dtypes.get(layer, "?")))
        if not flagged:
            return shares, None
        return shares, (f"NumericsMonitor: parameter updates lost to rounding over {len(self.update_steps)} sampled "
                        f"step(s) (new == old although the update was non-zero: it was below half an ulp of the "
                        f"weight):\n" + "\n".join(flagged) + f"\nFix: {UPDATE_FIXES}.")

    def _worst(self, layer: str) -> tuple[str, float]:
        shares = [(name, _share(*acc)) for name, acc in self.updates.get(layer, {}).items()]
        return max(((n, s) for n, s in shares if s is not None), key=lambda x: x[1], default=("", 0.0))

    def _update_line(self, layer: str, dtype: str) -> str:
        row = self.layer_row(layer)
        per = ", ".join(f"{n} {s:.1%}" for n, s in row["update_lost_share_by_param"].items() if s is not None)
        return f"  layer {layer!r} ({dtype}) lost {row['update_lost_share']:.1%} of its updates ({per})"

    def layer_row(self, layer: str) -> dict[str, Any]:
        """Summary keys of ``layer`` (empty if it had no counted update)."""
        params = self.updates.get(layer)
        if not params:
            return {}
        lost, moving = sum(c[0] for c in params.values()), sum(c[1] for c in params.values())
        return {"update_lost_share": _share(lost, moving), "update_lost": lost, "update_moving": moving,
                "update_lost_share_by_param": {n: _share(*c) for n, c in params.items()},
                "update_flagged": layer in self.lost_update_layers}

    def add_norm(self, counts: Mapping[str, tuple[int, int]],
                 info: Mapping[str, tuple[str, str, float | None]]) -> tuple[dict[str, float], str | None]:
        """One sampled training step: ``(unchanged, total)`` per module that ran, ``(class name, buffer dtype,
        momentum)`` per module. Returns the step's unchanged shares and one warning naming every module
        flagged for the first time (None if none)."""
        shares: dict[str, float] = {}
        flagged: list[str] = []
        for name, (unchanged, total) in counts.items():
            kind, dtype, momentum = info.get(name, ("?", "?", None))
            rec = self.norm_stats.setdefault(name, {"type": kind, "dtype": dtype, "momentum": momentum, "steps": 0,
                                                    "unchanged": 0, "total": 0, "streak": 0})
            share = unchanged / total if total else 0.0
            shares[name] = share
            rec.update(steps=rec["steps"] + 1, unchanged=rec["unchanged"] + unchanged, total=rec["total"] + total,
                       last_unchanged_share=share, dtype=dtype)
            rec["streak"] = rec["streak"] + 1 if share >= self.norm_stall_threshold else 0
            if rec["streak"] >= self.norm_stall_steps and name not in self.frozen_norm_stats:
                self.frozen_norm_stats.append(name)
                flagged.append(f"  {name!r} ({kind}, buffers {dtype}, momentum {momentum}): {share:.1%} of "
                               f"running_mean/running_var entries unchanged")
        if not flagged:
            return shares, None
        return shares, (f"NumericsMonitor: normalization running statistics stopped moving (entries that did not "
                        f"change over a training step in which the module ran, on {self.norm_stall_steps} sampled "
                        f"steps in a row; a momentum * (batch - running) update below half an ulp of the 16-bit "
                        f"statistic is rounded away, and evaluation then normalizes with stale statistics):\n"
                        + "\n".join(flagged) + f"\nFix: {NORM_FIXES}.")

    def norm_rows(self) -> dict[str, dict[str, Any]]:
        """Per norm module: dtype, momentum, sampled steps, unchanged share (all steps and last), flagged."""
        return {name: {"type": r["type"], "dtype": r["dtype"], "momentum": r["momentum"], "steps": r["steps"],
                       "unchanged_share": r["unchanged"] / r["total"] if r["total"] else None,
                       "last_unchanged_share": r.get("last_unchanged_share"),
                       "flagged": name in self.frozen_norm_stats}
                for name, r in self.norm_stats.items()}

    def report(self) -> dict[str, Any]:
        """Top-level keys of ``numerics_summary.json``."""
        return {"update_rounding": self.update_rounding, "update_steps": list(self.update_steps),
                "update_skipped_steps": list(self.update_skipped_steps),
                "lost_update_layers": list(self.lost_update_layers), "norm_stats": self.norm_rows(),
                "frozen_norm_stats": list(self.frozen_norm_stats)}


def plugin_update_rounding(plugin: Any) -> str:
    """How a precision plugin writes a step into the weights: ``PureHalfPrecision(update=...)``, else nearest."""
    update = getattr(plugin, "update", None) or getattr(getattr(plugin, "fp32_step", None), "update", None)
    return update if isinstance(update, str) else "nearest"


def plugin_loss_scale(plugin: Any) -> float | None:
    """A precision plugin's current loss scale (``LossScaler.scale`` or torch's ``GradScaler``), if it has one."""
    scaler = getattr(plugin, "scaler", None)
    if scaler is None:
        return None
    value = scaler.get_scale() if callable(getattr(scaler, "get_scale", None)) else getattr(scaler, "scale", None)
    return float(value) if isinstance(value, (int, float)) else None
