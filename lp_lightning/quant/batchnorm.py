"""Re-estimate BatchNorm running statistics with the current weights and frozen activation ranges (pure torch).

During QAT the activation ranges (and so the clip points) keep moving, and BatchNorm's running mean/var, an
average over recent steps, goes stale: at the end it can sit several standard deviations from the statistics
of the final weights. ``recalibrate_batchnorm`` replaces them with the exact average over a few training
batches, computed with everything else in eval mode (fake-quant layers quantize with their current ranges and
do not observe; dropout off), as "precise BN" does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """BatchNorm layers of ``model`` that keep running statistics, by fully-qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], num_batches: int,
                          forward: Callable[[Any], Tensor] | None = None) -> int:
    """Recompute every BatchNorm's running mean/var of ``model`` as the plain average over the first
    ``num_batches`` of ``batches`` (fed through ``forward``, default ``model``). Returns the batches used
    (0: nothing changed). The model's train/eval modes and the BN momenta are restored afterwards."""
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches={num_batches!r} must be a positive int")
    bns = list(batchnorm_layers(model).values())
    if not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    saved = [(bn, bn.momentum, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches fed
        bn.train()
    used = 0
    try:
        for batch in batches:
            if used >= num_batches:
                break
            (forward or model)(batch)
            used += 1
    finally:
        for bn, momentum, mean, var, count in saved:
            bn.momentum = momentum
            if used == 0:  # nothing seen: keep the old statistics
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(count)
        for m, mode in modes.items():
            m.training = mode
    return used
