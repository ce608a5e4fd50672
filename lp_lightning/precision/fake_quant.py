"""INT8/INT4 quantization-aware training: a Lightning precision plugin over ``lp_lightning.quant``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.precision.utils import _DtypeContextManager
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_debug, rank_zero_info, rank_zero_warn
from torch import nn

from lp_lightning.precision.fake_quant_setup import (
    attach_bn_recalibration,
    warn_eval_mode,
    warn_weights_only_checkpoints,
)
from lp_lightning.precision.fastpath import transformer_fastpath_off
from lp_lightning.quant import (
    GRANULARITIES,
    MovingAverageMinMaxObserver,
    QuantSpec,
    accept_plain_state_dicts,
    broadcast_observers,
    dequantize,
    fake_quant_layers,
    load_quant_state,
    matches,
    parse_bits,
    quant_state_dict,
    quantize_modules,
)
from lp_lightning.quant.checks import unobserved_layers, unquantizable_layers
from lp_lightning.quant.range_monitor import RangeMonitor


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
        averaging_constant: weight of each new batch in the observers' moving average (0.1: a ~10-step
            memory that follows growing activations; 0.01 lagged ~2x behind them and lost up to 28 points on
            a depthwise-separable CNN, docs/qat.md).
        bn_recalibration: when the model has BatchNorm layers, attach a
            :class:`~lp_lightning.callbacks.BatchNormRecalibration` over this many training batches to the
            Trainer (unless one is attached already): BN statistics are re-estimated with the current weights
            and ranges before each validation and at each epoch's end. ``None``: do not (a warning says the
            statistics will be stale).

Freezing: ``freeze_observers_after`` freezes every range at that step, also one still growing (then it clips
until the end: the shipped 200 steps cost up to 73 points). Freeze only once the logged ``range_growth`` is
near 0 (e.g. for a last fine-tuning epoch); a warning names the layers clipping more than 1% when they freeze.

Logged (when attached to a Trainer, every ``log_every_n_steps``): ``fake_quant/clipped/<layer>`` (fraction of
the layer's inputs outside its range) and ``fake_quant/range_growth/<layer>``; a layer clipping more than 1%
three measurements in a row is named in a warning. Fail fast (warnings naming the layers): fake-quant or
BatchNorm layers in eval mode at the first training step, observers that saw no data in it, and
Linear/Conv-like layers that are not skipped but cannot be swapped.

    After ``convert_module``, ``converted_layers`` lists the fake-quant layers (also logged).

    Checkpoints: ``checkpoint["state_dict"]`` holds the plain model's entries only (the latent float
    weights), so ``MyModule.load_from_checkpoint(path)`` and a fresh ``Trainer.fit/test(ckpt_path=...)``
    load it; the fake-quant buffers (weight scales, observer ranges) are in
    ``checkpoint["FakeQuantPrecision"]["module_state"]`` beside ``config`` and ``steps``, and this plugin
    loads them back after ``convert_module``. ``MyModule.load_from_checkpoint`` therefore gives the float
    model WITHOUT fake quantization; ``lp_lightning.load_checkpoint(MyModule, path)`` (or
    ``restore_module``) gives the fake-quant model. Checkpoints written with ``save_weights_only=True``
    carry no plugin state: their ``state_dict`` keeps the fake-quant buffers (a warning says so).
    """

    precision: str = "32-true"

    def __init__(self, weight: str | int = "int8", activation: str | int | None = "int8",
                 granularity: str = "per_channel", group_size: int = 32,
                 freeze_observers_after: int | None = None, skip: Sequence[str] | None = None,
                 averaging_constant: float = 0.1, bn_recalibration: int | None = 16) -> None:
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
        if bn_recalibration is not None and (isinstance(bn_recalibration, bool) or not isinstance(
                bn_recalibration, int) or bn_recalibration < 1):
            raise ValueError(f"FakeQuantPrecision(bn_recalibration={bn_recalibration!r}) must be None (off) or a "
                             "positive number of training batches")
        self.spec = QuantSpec(weight_bits, granularity, group_size if granularity == "per_group" else None,
                              act_bits, float(averaging_constant))
        self.config: dict[str, Any] = {
            "weight": f"int{weight_bits}", "activation": None if act_bits is None else f"int{act_bits}",
            "granularity": granularity, "group_size": int(group_size),
            "freeze_observers_after": freeze_observers_after, "skip": list(skip or []),
            "averaging_constant": float(averaging_constant), "bn_recalibration": bn_recalibration,
        }
        self.compute_dtype: torch.dtype = torch.float32
        self.freeze_observers_after = freeze_observers_after
        self.skip: list[str] = list(skip or [])
        self.steps = 0
        self.converted_layers: list[str] = []
        self.bn_recalibration = bn_recalibration
        self.monitor = RangeMonitor({})
        self._checked_first_step = False
        self._observers: list[MovingAverageMinMaxObserver] = []
        self._module: nn.Module | None = None  # the module convert_module swapped: its buffers go to checkpoints
        self._pending_state: Mapping[str, Any] | None = None  # module_state loaded before convert_module

    @property
    def num_converted(self) -> int:
        """How many layers are fake-quantized."""
        return len(self.converted_layers)

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Swap the eligible layers in place (idempotent: already fake-quant layers are kept)."""
        unmatched = [e for e in self.skip if not any(matches(n, [e]) for n, _ in module.named_modules())]
        if unmatched:  # shared configs name layers of several nets; only a skip list matching nothing warns
            say = rank_zero_warn if len(unmatched) == len(self.skip) else rank_zero_debug
            say(f"FakeQuantPrecision(skip=...): {unmatched} match no module of {type(module).__name__}")
        names = quantize_modules(module, self.spec, self.skip)
        if not names:
            raise ValueError(f"FakeQuantPrecision found no quantizable layer (nn.Linear, nn.Conv1d, nn.Conv2d) in "
                             f"{type(module).__name__} (skip={self.skip!r}): fake quantization would change nothing")
        self.converted_layers = names
        self._module = module
        self.monitor = RangeMonitor(fake_quant_layers(module))
        self._checked_first_step = False
        missed = unquantizable_layers(module, self.skip)
        if missed:
            rank_zero_warn(f"FakeQuantPrecision: {len(missed)} layer(s) stay float32 although not skipped: "
                           + "; ".join(f"{n!r}: {why}" for n, why in missed.items())
                           + f". Skip them explicitly (skip={sorted(missed)!r}) or use the plain torch types")
        attach_bn_recalibration(module, self.bn_recalibration)
        self._observers = [layer.act_observer for layer in fake_quant_layers(module).values()
                           if layer.act_observer is not None]
        accept_plain_state_dicts(module)  # e.g. test(ckpt_path="best") after fit: the trainer's module is converted
        warn_weights_only_checkpoints(module)
        if self._pending_state is not None:
            load_quant_state(module, self._pending_state, owner="FakeQuantPrecision")
            self._pending_state = None
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
        if not self._checked_first_step and self._module is not None:
            warn_eval_mode(self._module)
        if self.steps % self._log_every() == 0:
            self.monitor.arm()
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
        if not self._checked_first_step and self._module is not None:
            self._checked_first_step = True
            unobserved = unobserved_layers(self._module)
            if unobserved:
                rank_zero_warn(f"FakeQuantPrecision: the activation observers of {unobserved} saw no data in the "
                               "first training step (the layer is not called by forward, or runs in eval mode): "
                               "their inputs stay float32 in training and export")
        if self.monitor.armed:
            self._log_ranges(model, self.monitor.collect())
        if self._should_freeze() and not self._all_frozen():
            broadcast_observers(self._observers)  # every rank freezes the same ranges
            self._freeze()
        return output

    def _should_freeze(self) -> bool:
        return self.freeze_observers_after is not None and self.steps >= self.freeze_observers_after

    def _all_frozen(self) -> bool:
        return all(obs.is_frozen for obs in self._observers)

    def _log_every(self) -> int:
        trainer = getattr(self._module, "_trainer", None)
        return max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))

    def _log_ranges(self, model: Any, stats: dict[str, float]) -> None:
        if not stats or not isinstance(model, pl.LightningModule) or model._trainer is None:
            return
        with contextlib.suppress(MisconfigurationException):
            for key, value in stats.items():
                model.log(f"fake_quant/{key}", value, on_step=True, on_epoch=False, batch_size=1)

    def _freeze(self) -> None:
        if not self._all_frozen():
            rank_zero_info(f"FakeQuantPrecision: activation observers frozen after {self.steps} step(s)")
            clipping = self.monitor.above()
            if clipping:
                rank_zero_warn(f"FakeQuantPrecision: freezing the activation ranges of layers that still clip "
                               f"more than 1% of their inputs: { {n: round(v, 4) for n, v in clipping.items()} }; "
                               "freeze later (freeze_observers_after) or not at all")
        for obs in self._observers:
            obs.freeze()

    def state_dict(self) -> dict[str, Any]:
        return {"config": dict(self.config), "steps": self.steps, "converted_layers": list(self.converted_layers)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Move the fake-quant buffers out of ``checkpoint["state_dict"]`` into this plugin's entry
        (``module_state``), so the state dict loads into the plain model."""
        if self._module is None or not isinstance(checkpoint.get("state_dict"), dict):
            return
        weights = checkpoint["state_dict"]
        moved = {k: weights.pop(k) for k in quant_state_dict(self._module) if k in weights}
        checkpoint.setdefault(type(self).__qualname__, self.state_dict())["module_state"] = moved

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore ``steps`` and, when the checkpoint has them, the fake-quant buffers (``module_state``) of the
        converted module (or of the module ``convert_module`` converts next); freeze the observers when past
        ``freeze_observers_after``."""
        saved = dict(state_dict.get("config", {}))
        if saved and saved != self.config:
            rank_zero_warn(f"FakeQuantPrecision: the checkpoint was trained with {saved}, this plugin is {self.config}")
        self._restore(state_dict)

    def _restore(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        module_state = state.get("module_state")
        if module_state is not None and self._module is None:
            self._pending_state = module_state
        elif module_state is not None:
            load_quant_state(self._module, module_state, owner="FakeQuantPrecision")
        if self._module is not None and self._should_freeze():
            self._freeze()

    @classmethod
    def restore_module(cls, module: nn.Module, state: Mapping[str, Any]) -> nn.Module:
        """Rebuild the fake-quant structure recorded in a checkpoint's plugin ``state`` (in place) and load its
        ``module_state`` (scales, observer ranges) when present; then the checkpoint's ``state_dict`` loads
        into ``module`` (a full old-format one as well as a plain one: missing fake-quant entries keep theirs)."""
        config = state.get("config") if isinstance(state, Mapping) else None
        if not isinstance(config, Mapping):
            raise ValueError(f"FakeQuantPrecision state has no 'config' mapping: {state!r}")
        plugin = cls(**config)
        plugin.convert_module(module)
        plugin._restore(state)
        return module

    def reference_module(self, module: nn.Module, dtype: torch.dtype) -> nn.Module:
        """A NEW plain unquantized copy of ``module`` (original float weights, plain layer types) in ``dtype``."""
        return dequantize(module, snap=False).to(dtype)
