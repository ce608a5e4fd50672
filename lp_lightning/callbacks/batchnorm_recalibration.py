"""Re-estimate BatchNorm statistics on training batches before every validation and at each epoch's end."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset

from lp_lightning.batches import BatchKeys
from lp_lightning.quant.batchnorm import batchnorm_layers, recalibrate_batchnorm


class BatchNormRecalibration(Callback):
    """Replace BatchNorm's running statistics with their average over ``num_batches`` training batches,
    computed with the current weights and (fake-quant) activation ranges, everything else in eval mode.

    Runs before each validation of ``fit`` and at each training epoch's end (once per optimizer step count),
    so validation, ``best``/``last`` checkpoints, ``convert`` and export all see statistics of the final
    weights. The batches are the first ``num_batches`` of the training set in dataset order (a fresh
    unshuffled loader, so the training loader's shuffling is not advanced). FakeQuantPrecision attaches one
    when the model has BatchNorm layers (``FakeQuantPrecision(bn_recalibration=...)``).

    Args:
        num_batches: training batches averaged (>= 1).
        input_key, input_index: where the model's input is in a dict / tuple batch (see ``BatchKeys``).
    """

    def __init__(self, num_batches: int = 16, input_key: str = "input", input_index: int = 0) -> None:
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"BatchNormRecalibration(num_batches={num_batches!r}) must be a positive int")
        self.num_batches = num_batches
        self.keys = BatchKeys(input_key=input_key, input_index=input_index, target_key=None, target_index=None)
        self._done_at_step = -1

    def _batches(self, trainer: L.Trainer) -> Any:
        loader = trainer.train_dataloader
        if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
            return DataLoader(loader.dataset, batch_size=loader.batch_size or 1, shuffle=False,
                              collate_fn=loader.collate_fn)
        return loader

    def recalibrate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """Recalibrate now (once per global step); returns the batches used."""
        if self._done_at_step == trainer.global_step or not batchnorm_layers(pl_module):
            return 0
        loader = self._batches(trainer)
        if loader is None:
            return 0

        def forward(batch: Any) -> torch.Tensor:
            return pl_module(move_data_to_device(self._inputs(batch), pl_module.device))

        with trainer.precision_plugin.forward_context():
            used = recalibrate_batchnorm(pl_module, loader, self.num_batches, forward)
        self._done_at_step = trainer.global_step
        if used:
            rank_zero_info(f"BatchNormRecalibration: BatchNorm statistics re-estimated on {used} batch(es) "
                           f"at step {trainer.global_step}")
        return used

    def _inputs(self, batch: Any) -> torch.Tensor:
        try:
            return self.keys.inputs(batch)
        except ValueError as exc:  # e.g. dict batches and the default input_key
            raise ValueError(f"BatchNormRecalibration: {exc}. FakeQuantPrecision attaches one with the default "
                             "keys: pass FakeQuantPrecision(bn_recalibration=None) and callbacks=[BatchNorm"
                             "Recalibration(input_key=..., input_index=...)] naming your batch's input") from exc

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Check the batch keys on the first training batch, not at the first recalibration an epoch later."""
        if trainer.global_step == 0 and batch_idx == 0 and batchnorm_layers(pl_module):
            self._inputs(batch)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and trainer.global_step > 0:
            self.recalibrate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0:
            self.recalibrate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0:
            self.recalibrate(trainer, pl_module)
