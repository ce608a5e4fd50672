"""The one classifier LightningModule: cross-entropy, accuracy, optimizer and schedule from config."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lp_lightning.models.nets import build_net
from lp_lightning.models.optim import build_optimizer, build_scheduler


def _plain(value: Any) -> Any:
    """Convert tuples/OmegaConf containers to lists/dicts so checkpoints load with weights_only=True."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class Classifier(L.LightningModule):
    """Image classifier around one of the nets ``mlp``, ``cnn``, ``vit``.

    Args:
        net: net name. input_shape, num_classes: from the datamodule.
        net_kwargs: extra net arguments (widths, depth).
        optimizer: ``{"name": "sgd"|"adam"|"adamw"|"rmsprop"|..., "lr": ..., <its arguments>}``.
        scheduler: ``None`` or ``{"name": "cosine"|"step", ...}``.
        data: the datamodule's config (``{"name": ..., <kwargs>}``), kept so tools can rebuild it.
    """

    def __init__(
        self,
        net: str = "cnn",
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        net_kwargs: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters({
            "net": net,
            "input_shape": _plain(input_shape),
            "num_classes": int(num_classes),
            "net_kwargs": _plain(net_kwargs or {}),
            "optimizer": _plain(optimizer or {"name": "sgd", "lr": 0.05, "momentum": 0.9}),
            "scheduler": _plain(scheduler) if scheduler else None,
            "data": _plain(data) if data else None,
        })
        self.net = build_net(net, input_shape, num_classes, **self.hparams.net_kwargs)
        self.train_acc = MulticlassAccuracy(num_classes=max(2, num_classes), average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=max(2, num_classes), average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=max(2, num_classes), average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x).float()  # the loss and metrics are computed in fp32 whatever the net's dtype
        loss = F.cross_entropy(logits, y)
        metric = getattr(self, f"{stage}_acc")
        metric(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", sync_dist=stage != "train")
        self.log(f"{stage}/acc", metric, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0])

    def _schedule_span(self) -> tuple[int, str]:
        """(length, interval) of the LR schedule: ``max_epochs`` epochs, or with a step budget only
        (``max_epochs=-1``) the Trainer's estimated optimizer steps."""
        trainer = self._trainer
        if trainer is None:
            return 1, "epoch"
        if trainer.max_epochs is not None and trainer.max_epochs >= 1:
            return trainer.max_epochs, "epoch"
        steps = trainer.estimated_stepping_batches
        return (int(steps), "step") if math.isfinite(steps) else (1, "epoch")

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.parameters(), self.hparams.optimizer)
        span, interval = self._schedule_span()
        scheduler = build_scheduler(optimizer, self.hparams.scheduler, span)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Stretch a saved cosine schedule to this run's length (a resume with a larger ``max_epochs``)."""
        max_epochs = self._trainer.max_epochs if self._trainer is not None else None
        if max_epochs is not None and max_epochs >= 1 and (self.hparams.scheduler or {}).get("name") == "cosine":
            stretch_cosine(checkpoint, max_epochs)  # (a step budget's span is fixed by max_steps)

    @torch.no_grad()
    def predict_logits(self, x: Tensor) -> Tensor:
        """Logits for a batch in eval mode, restoring the previous mode."""
        was_training = self.training
        self.eval()
        try:
            return self(x)
        finally:
            self.train(was_training)


def stretch_cosine(checkpoint: dict[str, Any], t_max: int) -> None:
    """Set the saved cosine schedule's period to ``t_max`` and its learning rates to that schedule's value at
    the saved position, so the resumed run follows a fresh run of the new length (not a restarted cosine)."""
    schedulers, optimizers = checkpoint.get("lr_schedulers") or [], checkpoint.get("optimizer_states") or []
    if len(schedulers) != 1 or len(optimizers) != 1 or schedulers[0].get("T_max") in (None, t_max):
        return
    state = schedulers[0]
    state["T_max"] = t_max
    position, floor = state.get("last_epoch", 0), state.get("eta_min", 0.0)
    lrs = [floor + (base - floor) * (1 + math.cos(math.pi * position / t_max)) / 2 for base in state["base_lrs"]]
    state["_last_lr"] = lrs
    for group, lr in zip(optimizers[0]["param_groups"], lrs, strict=True):
        group["lr"] = lr
