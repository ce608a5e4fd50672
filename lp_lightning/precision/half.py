"""Pure 16-bit training: weights, activations, gradients and optimizer state all in fp16 or bf16."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Generator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.precision.utils import _DtypeContextManager
from lightning.pytorch.plugins.precision import HalfPrecision
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.optim import LBFGS, Optimizer

from lp_lightning.precision.compute_trial import ComputeTrial
from lp_lightning.precision.fp32_compute import (
    COMPUTE_MODES,
    MODE_OPS,
    ForwardScope,
    Fp32Accumulate,
    compute_candidates,
)
from lp_lightning.precision.fp32_step import Fp32Step
from lp_lightning.precision.loss_scale import LossScaler, make_scaler
from lp_lightning.precision.norm_stats import cast_keeping_stats, check_norm_stats, release_stats

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                                  "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_LIGHTNING_NAMES = {torch.float16: "16-true", torch.bfloat16: "bf16-true"}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float16"``/``"bfloat16"`` (or aliases, or the torch dtype) -> torch dtype; ValueError otherwise."""
    if isinstance(dtype, torch.dtype) and dtype in _LIGHTNING_NAMES:
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype={dtype!r} is not supported; allowed: {sorted(DTYPES)}")


class PureHalfPrecision(HalfPrecision):
    """Standalone 16-bit training with optional loss scaling on the 16-bit gradients.

    Like Lightning's ``"16-true"``/``"bf16-true"`` (module and inputs cast, default dtype set during the
    step), plus:

    Args:
        dtype: ``"float16"`` or ``"bfloat16"``.
        loss_scale: ``None`` (no scaling), ``"dynamic"`` (grow/back off) or a fixed positive number. The 16-bit
            gradients are unscaled in place before clipping and the optimizer step; a step with an inf/nan
            gradient is skipped. The scale is logged as ``loss_scale`` and saved in checkpoints.
        compute: ``"native"`` (16-bit kernels), ``"fp32_accumulate"`` (matrix products on operands cast up to
            fp32, results rounded back to 16 bits; everything stored stays 16-bit), ``"native_fp32_attention"``
            (native, but attention in fp32: the fused CPU attention kernel is slow in bf16) or ``"auto"``: on
            devices with native 16-bit matrix units the first training steps time those three modes in turn
            (real steps) and the fastest is kept (rank 0's choice in DDP); without such units
            ``fp32_accumulate``. The choice and the times are logged once.
        init_scale, growth_factor, backoff_factor, growth_interval: settings of the dynamic scale.
        update: how a step's result is written into the 16-bit parameters. ``"stochastic"`` and ``"kahan"`` run
            ``optimizer.step()`` on fp32 copies of the parameters, gradients and state, then round back
            stochastically or with a 16-bit Kahan compensation buffer, so updates below half an ulp are not
            lost; ``"nearest"`` steps the 16-bit tensors in place (Lightning's ``bf16-true``). ``"auto"``
            (default): ``"kahan"`` for float16, ``"stochastic"`` for bfloat16, the better of the two for each
            dtype over 3 seeds of the vit with SGD (docs/pure16.md). Any ``torch.optim`` optimizer but
            LBFGS/SparseAdam; see ``fp32_step``.
        norm_stats: ``"float32"`` (default) keeps the running mean/var of BatchNorm/SyncBatchNorm/InstanceNorm in
            fp32 (a 16-bit running statistic freezes); ``"16bit"`` casts them like everything else.
    """

    precision: str = "16-true"

    def __init__(self, dtype: str | torch.dtype = "float16", loss_scale: float | str | None = None,
                 compute: str = "auto", init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, update: str = "auto",
                 norm_stats: str = "float32") -> None:
        self.compute_dtype: torch.dtype = parse_dtype(dtype)
        super().__init__(_LIGHTNING_NAMES[self.compute_dtype])  # type: ignore[arg-type]
        if compute not in COMPUTE_MODES:
            raise ValueError(f"compute={compute!r} is not supported; allowed: {list(COMPUTE_MODES)}")
        self.compute = compute
        self.scaler: LossScaler | None = make_scaler(loss_scale, init_scale, growth_factor, backoff_factor,
                                                      growth_interval)
        self.norm_stats = check_norm_stats(norm_stats)
        if update == "auto":  # fp16 keeps 10 mantissa bits: a compensation buffer beats rounding noise there
            update = "kahan" if self.compute_dtype == torch.float16 else "stochastic"
        self.fp32_step = Fp32Step(update, self.compute_dtype)
        self._trial: ComputeTrial | None = None
        self._evaluated = False  # an evaluation step ran since the last training step (not a mode's time)
        self._module: weakref.ref[nn.Module] | None = None
        self._scope = ForwardScope(self.compute_dtype)
        self._backward_scale: float | None = None
        self._found_inf: dict[int, bool] = {}  # per optimizer, set when its gradients were unscaled
        self._warned_loss_overflow = False
        self._fp16_loss: tuple[torch.Tensor, torch.Tensor] | None = None  # (loss, scaled) of the last backward

    # ------------------------------------------------------------------ module, inputs, compute mode
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Cast parameters and buffers to the 16-bit dtype (no fp32 copy is kept; norm statistics stay fp32
        unless ``norm_stats="16bit"``)."""
        self._module = weakref.ref(module)
        self._scope.detach()
        if self.norm_stats == "float32":
            return cast_keeping_stats(module, self.compute_dtype)
        release_stats(module, self.compute_dtype)
        return module.to(dtype=self.compute_dtype)

    @property
    def compute_mode(self) -> str:
        """The compute mode in use (during ``auto``'s trial: the mode of the step in progress)."""
        if self._trial is None:
            module = self._module() if self._module is not None else None
            param = next(module.parameters(), None) if module is not None else None
            device = param.device if param is not None else torch.device("cpu")
            modes, reason = compute_candidates(self.compute, self.compute_dtype, device)
            self._trial = ComputeTrial(modes)
            name = _dtype_name(self.compute_dtype)
            if self._trial.decided:
                rank_zero_info(f"PureHalfPrecision({name}): compute={modes[0]!r} ({reason})")
            else:
                rank_zero_info(f"PureHalfPrecision({name}): compute='auto' ({reason}): timing {modes} on the first "
                               f"{len(self._trial.schedule)} training steps")
        return self._trial.current

    def compute_context(self) -> contextlib.AbstractContextManager:
        """The context that applies the compute mode to everything it runs (used around backward)."""
        ops = MODE_OPS.get(self.compute_mode)
        return Fp32Accumulate(self.compute_dtype, ops) if ops is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def train_step_context(self) -> Generator[None, None, None]:
        """A training step: ``auto``'s trial times the previous step and moves on (see :class:`ComputeTrial`)."""
        _ = self.compute_mode  # creates the trial
        assert self._trial is not None
        if self._trial.step_started(interrupted=self._evaluated):
            self._trial.agree()
            rank_zero_info(f"PureHalfPrecision({_dtype_name(self.compute_dtype)}): compute='auto' chose "
                           f"{self._trial.choice!r} (median step {self._trial.summary()})")
        self._evaluated = False
        with self.forward_context():
            yield

    @contextlib.contextmanager
    def _eval_step_context(self) -> Generator[None, None, None]:
        self._evaluated = True
        with self.forward_context():
            yield

    def val_step_context(self) -> contextlib.AbstractContextManager:
        return self._eval_step_context()

    def test_step_context(self) -> contextlib.AbstractContextManager:
        return self._eval_step_context()

    def predict_step_context(self) -> contextlib.AbstractContextManager:
        return self._eval_step_context()

    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """16-bit default dtype and the compute mode; the default dtype is restored even if the step raises.

        ``fp32_accumulate`` applies to the products inside the forward of the converted module and its
        submodules (not to the step's metrics and logging; a product written in ``training_step`` itself
        runs on the native kernels).
        """
        with _DtypeContextManager(self.compute_dtype), self._forward_scope():
            yield

    @contextlib.contextmanager
    def _forward_scope(self) -> Generator[None, None, None]:
        module = self._module() if self._module is not None else None
        ops = MODE_OPS.get(self.compute_mode)
        if ops is None or module is None:
            with self.compute_context():
                yield
            return
        if not self._scope.attached:
            self._scope.attach(module)
        self._scope.ops = ops
        active, self._scope.active = self._scope.active, True
        try:
            yield
        finally:
            self._scope.active = active
            if not active:
                self._scope.reset()

    def teardown(self) -> None:
        """Remove the forward hooks of ``fp32_accumulate`` from the module."""
        self._scope.detach()
        super().teardown()

    # ------------------------------------------------------------------ backward and loss scaling
    def pre_backward(self, tensor: torch.Tensor, module: pl.LightningModule) -> torch.Tensor:  # type: ignore[override]
        if self.scaler is not None:
            self._backward_scale = self.scaler.scale
            self._found_inf.clear()  # new gradients: a manual loop may have unscaled (clipped) and not stepped
            scaled = self.scaler.scale_loss(tensor)
            # an fp16 loss can overflow when scaled (bf16's range cannot); checked only on a skipped step
            self._fp16_loss = (tensor.detach(), scaled.detach()) if scaled.dtype == torch.float16 else None
            tensor = scaled
        return super().pre_backward(tensor, module)

    def _warn_if_loss_overflowed(self) -> None:
        """Once, on a skipped step: the fp16 loss times the scale was inf (the loss itself finite)."""
        if self._fp16_loss is None or self._warned_loss_overflow:
            return
        loss, scaled = self._fp16_loss
        if bool(torch.isfinite(scaled).all()) or not bool(torch.isfinite(loss).all()):
            return
        self._warned_loss_overflow = True
        fate = "backs off until it fits" if self.scaler.dynamic else "is fixed, so every step is skipped"
        rank_zero_warn(f"PureHalfPrecision: the loss is {_dtype_name(loss.dtype)} and loss * {self.scaler.scale:g} "
                       f"overflows it (max {torch.finfo(loss.dtype).max:g}); the scale {fate}. Compute the loss "
                       "in float32, e.g. F.cross_entropy(logits.float(), y)")

    def backward(self, tensor: torch.Tensor, model: pl.LightningModule, optimizer: Any,  # type: ignore[override]
                 *args: Any, **kwargs: Any) -> None:
        # the forward scope too: activation checkpointing recomputes module forwards inside backward, and
        # torch does not carry the backward's function mode into them
        with self.compute_context(), self._forward_scope():
            super().backward(tensor, model, optimizer, *args, **kwargs)

    def unscale_gradients(self, optimizer: Optimizer) -> bool:
        """Unscale ``optimizer``'s 16-bit gradients in place (once per step); True if any is inf/nan."""
        if self.scaler is None:
            return False
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer (manual loops) -> torch's
        key = id(optimizer)
        if key not in self._found_inf:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self._found_inf[key] = self.scaler.unscale_(params, self._backward_scale)
        return self._found_inf[key]

    def optimizer_step(self, optimizer: Any, model: pl.LightningModule, closure: Callable[[], Any],  # type: ignore[override]
                       **kwargs: Any) -> Any:
        if self.scaler is None and self.fp32_step.update == "nearest":
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        if self.scaler is not None and isinstance(optimizer, LBFGS):
            raise MisconfigurationException("PureHalfPrecision loss scaling does not support LBFGS.")
        closure_result = closure()
        # automatic optimization may skip backward (training_step returned None): nothing to unscale or step
        if closure_result is None and model.automatic_optimization:
            self._after_closure(model, optimizer)
            self._found_inf.pop(id(getattr(optimizer, "_optimizer", optimizer)), None)
            return closure_result
        found_inf = self.unscale_gradients(optimizer)  # before the hooks, so clipping sees true gradients
        self._after_closure(model, optimizer)
        found_inf = self._found_inf.pop(id(getattr(optimizer, "_optimizer", optimizer)), found_inf)
        if found_inf:
            self._warn_if_loss_overflowed()
        result = None if found_inf else self.fp32_step.step(optimizer, **kwargs)
        if self.scaler is not None:
            self.scaler.update(found_inf)
            self._log_scale(model)
        return result

    def clip_gradients(self, optimizer: Optimizer, clip_val: int | float = 0.0,
                       gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM) -> None:
        """Clip the true (unscaled) gradients: unscales first where that has not happened yet (manual loops)."""
        if clip_val > 0:
            self.unscale_gradients(optimizer)
        super().clip_gradients(optimizer, clip_val=clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:
        """Clip by the total gradient norm computed in fp32: in fp16 a norm above 65504 is inf, and torch's
        ``clip_grad_norm_`` would then multiply every gradient by 0 instead of clipping it."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norms = [torch.linalg.vector_norm(g.coalesce()._values() if g.is_sparse else g, dtype=torch.float32)
                 for g in grads]
        device = norms[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
        coef = torch.clamp(clip_val / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device))

    def _log_scale(self, model: Any) -> None:
        if self.scaler is None or not isinstance(model, pl.LightningModule) or model._trainer is None:
            return
        with contextlib.suppress(MisconfigurationException):
            model.log("loss_scale", self.scaler.scale, on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The loss scaler's and the rounding generators' state (empty if neither, so Lightning stores nothing)."""
        state = {} if self.scaler is None else self.scaler.state_dict()
        return {**state, **self.fp32_step.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scaler is not None and "scale" in state_dict:
            self.scaler.load_state_dict(state_dict)
        self.fp32_step.load_state_dict(state_dict)

    def __repr__(self) -> str:
        scale = None if self.scaler is None else ("dynamic" if self.scaler.dynamic else self.scaler.scale)
        return (f"{type(self).__name__}(dtype={_dtype_name(self.compute_dtype)!r}, loss_scale={scale!r}, "
                f"compute={self.compute!r}, update={self.fp32_step.update!r}, norm_stats={self.norm_stats!r})")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
