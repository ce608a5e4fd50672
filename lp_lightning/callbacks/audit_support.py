"""Helpers of ToleranceAudit (pure torch): reference copy, RNG and train-mode guards, logits check and capture."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lp_lightning.batches import BatchKeys, is_logits

__all__ = ["REFERENCE_DTYPES", "SCOPE", "ValidationCapture", "check_forward", "check_logits", "describe", "eval_mode",
           "is_logits", "parse_reference", "reference_copy", "rng_preserved"]

SCOPE = "the Lemma-1 audit certifies classification logits only"

REFERENCE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def parse_reference(reference: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"float64"`` (or the torch dtype) -> dtype; ValueError for anything else."""
    name = str(reference).removeprefix("torch.") if isinstance(reference, torch.dtype) else reference
    if name not in REFERENCE_DTYPES:
        hint = (" (a reference must be of higher precision than the audited model)"
                if name in ("float16", "bfloat16", "half") else "")
        raise ValueError(f"reference={reference!r} is not allowed{hint}; use one of {sorted(REFERENCE_DTYPES)}")
    return REFERENCE_DTYPES[name]


def reference_copy(module: nn.Module, plugin: Any, dtype: torch.dtype) -> nn.Module:
    """A new plain copy of ``module`` in ``dtype`` (the plugin's ``reference_module`` if it has one)."""
    make = getattr(plugin, "reference_module", None)
    if callable(make):
        return make(module, dtype).eval()
    # deepcopy without the hooks other callbacks registered (copying them would copy those callbacks)
    memo: dict[int, Any] = {}
    for m in module.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(m, attr, None)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
    return copy.deepcopy(module, memo).to(dtype).eval()


@contextmanager
def rng_preserved() -> Iterator[None]:
    """Restore the torch (CPU and CUDA), numpy and python random states on exit."""
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(np_state)
        random.setstate(py_state)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own train flag on exit."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def describe(out: Any) -> str:
    """A short description of a model output for an error message: type, shape, dtype."""
    if isinstance(out, Tensor):
        dtype = str(out.dtype).removeprefix("torch.")
        return f"{'an' if dtype.startswith('i') else 'a'} {dtype} tensor of shape {tuple(out.shape)}"
    if isinstance(out, dict):
        return f"a dict with keys {sorted(map(str, out))}"
    if isinstance(out, (list, tuple)):
        return f"a {type(out).__name__} of {len(out)} ({', '.join(type(o).__name__ for o in out[:4])})"
    return f"a {type(out).__name__}"


def check_logits(out: Any, what: str) -> Tensor:
    """``out`` if it is (N, C) class logits with C >= 2; else a ValueError naming ``what`` returned it."""
    if not is_logits(out):
        raise ValueError(f"ToleranceAudit needs (N, C) classification logits with C >= 2 from {what}, got "
                         f"{describe(out)}; {SCOPE}")
    return out


def check_forward(module: nn.Module, plugin: Any, x: Tensor, setting: str, split: str) -> None:
    """Refuse, with one line naming the model, its output and ``setting``, a model whose no-grad eval-mode
    forward of ``x`` (through the plugin, as the audit runs it) raises or does not return class logits.
    Train modes and random streams are left as they were."""
    name = type(module).__name__
    change = ("set input_key / input_index to the model's input, or remove ToleranceAudit for a model that is not "
              "a classifier")
    try:
        with torch.no_grad(), rng_preserved(), eval_mode(module), plugin.forward_context():
            out = module(plugin.convert_input(x))
    except Exception as err:  # e.g. the labels were picked as the input
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{setting}: {name}'s forward on the {split} batch's input ({describe(x)}) raised "
                         f"{type(err).__name__}: {first}; {change}; {SCOPE}") from err
    if not is_logits(out, len(x)):
        raise ValueError(f"{setting}: {name} returned {describe(out)} for the {split} batch's input ({describe(x)}), "
                         f"not (N, C) classification logits with C >= 2 (N = {len(x)}); {SCOPE}: {change} "
                         "(e.g. a regression model)")


class ValidationCapture:
    """Forward hook recording the validation loop's own low-precision logits, one forward per batch.

    ``keys`` finds the input in a batch (dicts by key, tuples by position); a batch whose input it cannot find,
    or a step that is not one forward of that input, invalidates the capture and the audit recomputes.
    """

    def __init__(self, module: nn.Module, keys: BatchKeys | None = None) -> None:
        self.keys = keys or BatchKeys()
        self.inputs: list[Tensor] = []  # the converted inputs the loop passed to the module
        self.outputs: list[Any] = []
        self.valid = True
        self._calls: list[tuple[Any, Any]] = []
        self._x: Any = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.valid:
            self._calls.append((args[0] if args else None, output))

    def start(self, batch: Any, dataloader_idx: int) -> None:
        self._calls = []
        try:
            x: Tensor | None = self.keys.inputs(batch)
        except ValueError:
            x = None  # the input is not found: the audit recomputes (and reports the setting to change)
        self._x = x if dataloader_idx == 0 else None

    def end(self) -> None:
        if self._x is None or len(self._calls) != 1 or self._calls[0][0] is not self._x:
            self.valid = False  # a step that is not one plain forward of the batch: recompute instead
        if self.valid:
            self.inputs.append(self._x)
            self.outputs.append(self._calls[0][1])
        self._calls, self._x = [], None

    def outputs_for(self, xs: list[Tensor], plugin: Any) -> list[Any] | None:
        """The recorded outputs if they came from exactly ``convert_input`` of ``xs``; else None."""
        if not self.valid or len(self.inputs) < len(xs):
            return None
        for x, seen in zip(xs, self.inputs, strict=False):
            converted = plugin.convert_input(x)
            if converted.shape[0] > seen.shape[0] or not torch.equal(converted, seen[: len(converted)]):
                return None
        return [out[: len(x)] if isinstance(out, Tensor) else out for x, out in zip(xs, self.outputs, strict=False)]

    def close(self) -> None:
        self._handle.remove()
