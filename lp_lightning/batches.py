"""Where the input and the target are in a user's batch: ``(x, y)``, ``x``, longer tuples by position, or dicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class BatchKeys:
    """How to read a batch: dicts by ``input_key`` / ``target_key``, tuples and lists by ``input_index`` /
    ``target_index``, a bare tensor is the input (no target).

    ``target_key=None`` / ``target_index=None``: the batch has no target (labels are not needed, e.g. for the
    agreement of two models).
    """

    input_key: str = "input"
    target_key: str | None = "target"
    input_index: int = 0
    target_index: int | None = 1

    def __post_init__(self) -> None:
        for name in ("input_key", "target_key"):
            value = getattr(self, name)
            if not (value is None and name == "target_key") and (not isinstance(value, str) or not value):
                raise ValueError(f"{name}={value!r} must be a non-empty string (a key of the batch dict)")
        for name in ("input_index", "target_index"):
            value = getattr(self, name)
            if value is None and name == "target_index":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0 (a position in the batch tuple)")

    def inputs(self, batch: Any) -> Tensor:
        """The input tensor of ``batch``; ValueError naming the setting and what the batch holds."""
        return _pick(batch, self.input_key, self.input_index, "input")

    def targets(self, batch: Any) -> Tensor | None:
        """The target tensor of ``batch``, or None for a bare-tensor batch or when no target is configured."""
        if isinstance(batch, Tensor):
            return None
        if isinstance(batch, Mapping) and self.target_key is None:
            return None
        if isinstance(batch, Sequence) and self.target_index is None:
            return None
        return _pick(batch, self.target_key, self.target_index, "target")

    def split(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """``(inputs, targets)`` of ``batch``."""
        return self.inputs(batch), self.targets(batch)


def _pick(batch: Any, key: str | None, index: int | None, what: str) -> Tensor:
    if isinstance(batch, Tensor):
        if what == "input":
            return batch
        raise ValueError("the batch is a bare tensor: it has no target")
    if isinstance(batch, Mapping):
        if key not in batch:
            raise ValueError(f"{what}_key={key!r} is not a key of the batch dict; its keys are "
                             f"{sorted(map(str, batch))}: set {what}_key to one of them")
        value = batch[key]
        where = f"batch[{key!r}]"
    elif isinstance(batch, Sequence) and not isinstance(batch, str):
        assert index is not None
        if index >= len(batch):
            raise ValueError(f"{what}_index={index} is out of range for a batch of {len(batch)} element(s)")
        value = batch[index]
        where = f"batch[{index}]"
    else:
        raise ValueError(f"a batch of type {type(batch).__name__} is not supported: use a tensor, a tuple/list "
                         f"(input_index/target_index) or a dict (input_key/target_key)")
    if not isinstance(value, Tensor):
        raise ValueError(f"{where} (the {what}) is a {type(value).__name__}, not a tensor: set {what}_key / "
                         f"{what}_index to the {what} tensor")
    return value


def is_logits(out: Any, n: int | None = None) -> bool:
    """Whether ``out`` is (N, C) floating-point class logits with C >= 2 (and N == ``n`` if given)."""
    return (isinstance(out, Tensor) and out.ndim == 2 and out.shape[1] >= 2 and out.is_floating_point()
            and (n is None or out.shape[0] == n))


def require_logits(out: Any, owner: str, model: Any) -> Tensor:
    """``out`` if it is (N, C) classification logits with C >= 2 (:func:`is_logits`); else a one-line ValueError
    naming ``model``'s class, what it returned and what ``owner`` (the tool) needs."""
    if is_logits(out):
        return out
    got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
    if isinstance(out, Tensor) and not out.is_floating_point():
        got += f" and dtype {str(out.dtype).removeprefix('torch.')}"
    hint = (" (a regression output: top-1 agreement and the Lemma-1 certificate do not apply to it)"
            if isinstance(out, Tensor) and (out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1)) else "")
    raise ValueError(f"{owner} needs (N, C) classification logits with C >= 2 from {type(model).__name__}.forward"
                     f"(inputs), got {got}{hint}")
