"""The Classifier LightningModule, its nets (mlp, cnn, vit) and safe checkpoint loading."""

from lp_lightning.models.checkpoint import (
    CheckpointError,
    datamodule_from_hparams,
    load_classifier,
    read_checkpoint,
)
from lp_lightning.models.classifier import Classifier
from lp_lightning.models.nets import NETS, build_net

__all__ = [
    "NETS",
    "CheckpointError",
    "Classifier",
    "build_net",
    "datamodule_from_hparams",
    "load_classifier",
    "read_checkpoint",
]
