"""INT8/INT4 quantization-aware training: a Lightning precision plugin over ``lp_lightning.quant``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, cast

import torch
from lightning.fabric.plugins.precision.utils import _DtypeContextManager
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lp_lightning.precision.fastpath import transformer_fastpath_off
from lp_lightning.quant import (
    GRANULARITIES,
    MovingAverageMinMaxObserver,
    QuantSpec,
    broadcast_observers,
    dequantize,
    fake_quant_layers,
    matches,
    parse_bits,
    quantize_modules,
)


class FakeQuantPrecision(Precision):
    """Fake-quantize ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layers during training (QAT).

    Weights: symmetric (zero point 0) ``int8`` or ``int4``, one scale per output channel, or with
    ``granularity="per_group"`` one scale per ``group_size`` inputs of a Linear output row (Conv layers
    stay per channel: int4 convolutions have no per-group kernels). Activations (each layer's input):
    asymmetric per-tensor ``int8`` from a moving-average min/max observer, or ``None``. Gradients use
    the straight-through estimator of torch's fake-quantize ops. Training runs in float32.

    Args:
        weight: ``"int8"`` or ``"int4"``.
        activation: ``"int8"`` or ``None`` (weights-only).
        granularity: ``"per_channel"`` or ``"per_group"``.
        group_size: inputs per scale for ``"per_group"``; must divide each quantized Linear's in_features.
        freeze_observers_after: freeze the activation observers after this many optimizer steps
            (``None``: never); the step count is in this plugin's state, so a resumed run freezes on time.
        skip: layers kept in float32, by fully-qualified name (``"net.classifier"``), trailing part
            (``"classifier"``) or glob. Default: none, so the whole model can run as an integer graph;
            ``conf/precision/int4w.yaml`` keeps the cnn stem, the vit patch embedding and the head in float32.
        averaging_constant: weight of each new batch in the observers' moving average.

    After ``convert_module``, ``converted_layers`` lists the fake-quant layers (also logged).
    """

    precision: str = "32-true"

    def __init__(self, weight: str | int = "int8", activation: str | int | None = "int8",
                 granularity: str = "per_channel", group_size: int = 32,
                 freeze_observers_after: int | None = None, skip: Sequence[str] | None = None,
                 averaging_constant: float = 0.01) -> None:
        weight_bits = cast(int, parse_bits(weight, "weight", (8, 4), owner="FakeQuantPrecision"))
        act_bits = parse_bits(activation, "activation", (8,), allow_none=True, owner="FakeQuantPrecision")
        if granularity not in GRANULARITIES:
            raise ValueError(f"FakeQuantPrecision(granularity={granularity!r}) is unknown; "
                             f"allowed: {list(GRANULARITIES)}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"FakeQuantPrecision(group_size={group_size!r}) must be a positive int")
        if freeze_observers_after is not None and (isinstance(freeze_observers_after, bool) or not isinstance(
                freeze_observers_after, int) or freeze_observers_after < 1):
            raise ValueError(f"FakeQuantPrecision(freeze_observers_after={freeze_observers_after!r}) must be "
                             "None (never freeze) or a positive number of optimizer steps")
        if isinstance(skip, str) or (skip is not None and not all(isinstance(s, str) for s in skip)):
            raise ValueError(f"FakeQuantPrecision(skip={skip!r}) must be a list of module names, e.g. ['classifier']")
        if not isinstance(averaging_constant, (int, float)) or not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"FakeQuantPrecision(averaging_constant={averaging_constant!r}) must be in (0, 1]")
        self.spec = QuantSpec(weight_bits, granularity, group_size if granularity == "per_group" else None,
                              act_bits, float(averaging_constant))
        self.config: dict[str, Any] = {
            "weight": f"int{weight_bits}", "activation": None if act_bits is None else f"int{act_bits}",
            "granularity": granularity, "group_size": int(group_size),
            "freeze_observers_after": freeze_observers_after, "skip": list(skip or []),
            "averaging_constant": float(averaging_constant),
        }
        self.compute_dtype: torch.dtype = torch.float32
        self.freeze_observers_after = freeze_observers_after
        self.skip: list[str] = list(skip or [])
        self.steps = 0
        self.converted_layers: list[str] = []
        self._observers: list[MovingAverageMinMaxObserver] = []

    @property
    def num_converted(self) -> int:
        """How many layers are fake-quantized."""
        return len(self.converted_layers)

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Swap the eligible layers in place (idempotent: already fake-quant layers are kept)."""
        unmatched = [e for e in self.skip if not any(matches(n, [e]) for n, _ in module.named_modules())]
        if unmatched:  # shared configs name layers of several nets; only a skip list matching nothing warns
            say = rank_zero_warn if len(unmatched) == len(self.skip) else rank_zero_info
            say(f"FakeQuantPrecision(skip=...): {unmatched} match no module of {type(module).__name__}")
        names = quantize_modules(module, self.spec, self.skip)
        if not names:
            raise ValueError(f"FakeQuantPrecision found no quantizable layer (nn.Linear, nn.Conv1d, nn.Conv2d) in "
                             f"{type(module).__name__} (skip={self.skip!r}): fake quantization would change nothing")
        self.converted_layers = names
        self._observers = [layer.act_observer for layer in fake_quant_layers(module).values()
                           if layer.act_observer is not None]
        if self._should_freeze():
            self._freeze()
        spec = self.spec
        weights = f"int{spec.weight_bits} {spec.granularity}" + (f"/{spec.group_size}" if spec.group_size else "")
        acts = f"int{spec.act_bits} per-tensor" if spec.act_bits else "float32"
        rank_zero_info(f"FakeQuantPrecision: {len(names)} layer(s) fake-quantized (weights {weights}, "
                       f"activations {acts}); skipped: {self.skip or 'none'}")
        return module

    @contextlib.contextmanager
    def train_step_context(self) -> Generator[None, None, None]:
        """Every DDP rank starts the training step from rank 0's observer ranges (DDP's own buffer broadcast
        skips the forward after a ``no_sync`` micro-batch of gradient accumulation); then ``forward_context``."""
        if not self._all_frozen():  # frozen ranges no longer change: nothing to send
            broadcast_observers(self._observers)
        with self.forward_context():
            yield

    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """Run the step in float32 with the fake-quant layers' own forwards (no fused Transformer fast path);
        restore the previous default dtype and fast-path setting afterwards (also on errors)."""
        with _DtypeContextManager(torch.float32), transformer_fastpath_off():
            yield

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        """The optimizer step, then count it and freeze the observers once ``freeze_observers_after`` is reached."""
        output = super().optimizer_step(optimizer, model, closure, **kwargs)
        self.steps += 1
        if self._should_freeze() and not self._all_frozen():
            broadcast_observers(self._observers)  # every rank freezes the same ranges
            self._freeze()
        return output

    def _should_freeze(self) -> bool:
        return self.freeze_observers_after is not None and self.steps >= self.freeze_observers_after

    def _all_frozen(self) -> bool:
        return all(obs.is_frozen for obs in self._observers)

    def _freeze(self) -> None:
        if not self._all_frozen():
            rank_zero_info(f"FakeQuantPrecision: activation observers frozen after {self.steps} step(s)")
        for obs in self._observers:
            obs.freeze()

    def state_dict(self) -> dict[str, Any]:
        return {"config": dict(self.config), "steps": self.steps, "converted_layers": list(self.converted_layers)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        saved = dict(state_dict.get("config", {}))
        if saved and saved != self.config:
            rank_zero_warn(f"FakeQuantPrecision: the checkpoint was trained with {saved}, this plugin is {self.config}")
        self.steps = int(state_dict.get("steps", 0))

    @classmethod
    def restore_module(cls, module: nn.Module, state: Mapping[str, Any]) -> nn.Module:
        """Rebuild the fake-quant structure recorded in a checkpoint's plugin ``state`` (in place), so the
        checkpoint's state dict (with its observer and scale buffers) loads into ``module``."""
        config = state.get("config") if isinstance(state, Mapping) else None
        if not isinstance(config, Mapping):
            raise ValueError(f"FakeQuantPrecision state has no 'config' mapping: {state!r}")
        plugin = cls(**config)
        plugin.steps = int(state.get("steps", 0))
        return plugin.convert_module(module)

    def reference_module(self, module: nn.Module, dtype: torch.dtype) -> nn.Module:
        """A NEW plain unquantized copy of ``module`` (original float weights, plain layer types) in ``dtype``."""
        return dequantize(module, snap=False).to(dtype)
