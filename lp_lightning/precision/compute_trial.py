"""``compute="auto"`` decided by measurement: time real training steps in each candidate mode, keep the fastest.

A CPU flag says whether a 16-bit matrix product is fast, not whether a whole step is: on this project's CPU a
bf16 matmul is 2.5x faster than fp32, yet the vit's bf16 step was 3.2x slower than fp32 (its fused attention
kernel is ~14x slower in bf16). So the first training steps of a fit run the candidate modes in turn (a warm-up
step each, then ``rounds`` interleaved rounds); the mode with the lowest median step time wins, the flags'
preference breaking near-ties. Every trial step is a real training step (each mode computes correct gradients).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch


class ComputeTrial:
    """The schedule and the decision of the measured ``auto`` choice among ``candidates`` (flags' order)."""

    def __init__(self, candidates: Sequence[str], rounds: int = 3, tie: float = 0.03) -> None:
        if not candidates:
            raise ValueError("ComputeTrial needs at least one candidate mode")
        self.candidates = list(candidates)
        self.rounds = rounds
        self.tie = tie  # relative difference below which the flags' preference wins
        self.schedule = [c for _ in range(1 + rounds) for c in self.candidates] if len(candidates) > 1 else []
        self.times: dict[str, list[float]] = {c: [] for c in self.candidates}
        self.position = 0
        self.choice: str | None = None if self.schedule else self.candidates[0]
        self._start: float | None = None

    @property
    def current(self) -> str:
        """The mode of the step in progress (the choice once decided)."""
        return self.choice if self.choice is not None else self.schedule[self.position]

    @property
    def decided(self) -> bool:
        return self.choice is not None

    def step_started(self, interrupted: bool = False) -> bool:
        """A training step starts: close the previous step's period (unless ``interrupted`` by evaluation,
        whose time is not the mode's) and move to the next mode. Returns True when this call decided."""
        now = time.perf_counter()
        if self.choice is not None:
            return False
        if self._start is not None and not interrupted:
            if self.position >= len(self.candidates):  # the first round warms each mode up (one-time setup)
                self.times[self.schedule[self.position]].append(now - self._start)
            self.position += 1
            if self.position == len(self.schedule):
                self.choice = self.decide()
                return True
        self._start = now
        return False

    def decide(self) -> str:
        """The mode with the lowest median step time; a candidate earlier in the flags' order wins a near-tie."""
        medians = self.medians()
        best = min(medians.values())
        return next(c for c in self.candidates if medians[c] <= best * (1 + self.tie))

    def medians(self) -> dict[str, float]:
        return {c: statistics.median(t) for c, t in self.times.items() if t}

    def agree(self) -> None:
        """In a multi-process run every rank takes rank 0's choice (its timings are its own)."""
        if self.choice is None or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if torch.distributed.get_world_size() > 1:
            box = [self.choice]
            torch.distributed.broadcast_object_list(box, src=0)
            self.choice = box[0]

    def summary(self) -> str:
        """``mode median ms`` per candidate, for the log line."""
        return ", ".join(f"{c} {m * 1e3:.2f} ms" for c, m in self.medians().items())
