"""What FakeQuantPrecision checks and attaches around training: fail-fast warnings naming layers, the BatchNorm
re-estimation callback."""

from __future__ import annotations

from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lp_lightning.quant.batchnorm import batchnorm_layers
from lp_lightning.quant.checks import eval_mode_layers


def warn_eval_mode(module: nn.Module) -> None:
    """Warn naming the fake-quant/BatchNorm layers in eval mode at the first training step."""
    frozen = eval_mode_layers(module)
    if frozen:
        rank_zero_warn(f"FakeQuantPrecision: {frozen} are in eval mode at the first training step, so their activation "
                       "observers never observe and BatchNorm statistics never update (Lightning keeps a model that "
                       "starts fit in eval mode in eval mode): call model.train() before trainer.fit(...)")


def attach_bn_recalibration(module: nn.Module, num_batches: int | None) -> None:
    """Put a BatchNormRecalibration first among the Trainer's callbacks when ``module`` has BatchNorm layers
    (first: it runs before the checkpoint callbacks of the same hook); warn when ``num_batches`` is None."""
    from lp_lightning.callbacks.batchnorm_recalibration import BatchNormRecalibration

    bns = batchnorm_layers(module)
    trainer = getattr(module, "_trainer", None)
    if not bns or trainer is None or any(isinstance(cb, BatchNormRecalibration) for cb in trainer.callbacks):
        return
    if num_batches is None:
        rank_zero_warn(f"FakeQuantPrecision(bn_recalibration=None): BatchNorm layers {sorted(bns)} keep running "
                       "statistics averaged while the weights and ranges moved; they can be stale at the end of "
                       "training (measured: 3 standard deviations off on a depthwise-separable CNN). Add "
                       "lp_lightning.callbacks.BatchNormRecalibration")
        return
    trainer.callbacks.insert(0, BatchNormRecalibration(num_batches))
    rank_zero_info(f"FakeQuantPrecision: attached BatchNormRecalibration({num_batches}) "
                   f"for {len(bns)} BatchNorm layer(s)")


def warn_weights_only_checkpoints(module: nn.Module) -> None:
    """Warn when the Trainer of ``module`` writes ``save_weights_only`` checkpoints: they keep the fake-quant
    buffers in their state dict (no plugin hook runs for them)."""
    trainer = getattr(module, "_trainer", None)  # a LightningModule attached to a Trainer
    if any(getattr(cb, "save_weights_only", False) for cb in getattr(trainer, "checkpoint_callbacks", [])):
        rank_zero_warn("FakeQuantPrecision: ModelCheckpoint(save_weights_only=True) saves no plugin state, so its "
                       "checkpoints keep the fake-quant buffers in 'state_dict' and have no fake-quant config: they "
                       "load only into a module converted by FakeQuantPrecision (plugin.convert_module(model) "
                       "first), not into the plain model or a fresh Trainer(ckpt_path=...); drop save_weights_only "
                       "for checkpoints that load anywhere")
