"""The one classifier LightningModule: cross-entropy, accuracy, optimizer and schedule from config."""

from __future__ import annotations

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

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.parameters(), self.hparams.optimizer)
        max_epochs = self.trainer.max_epochs if self._trainer is not None and self.trainer.max_epochs else 1
        scheduler = build_scheduler(optimizer, self.hparams.scheduler, max_epochs)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Re-apply module swaps recorded by structural plugins (fake-quant) so a resumed fit loads its state."""
        from lp_lightning.models.checkpoint import restore_structure  # checkpoint.py imports this module

        restore_structure(self, checkpoint)

    @torch.no_grad()
    def predict_logits(self, x: Tensor) -> Tensor:
        """Logits for a batch in eval mode, restoring the previous mode."""
        was_training = self.training
        self.eval()
        try:
            return self(x)
        finally:
            self.train(was_training)
