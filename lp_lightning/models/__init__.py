"""The Classifier LightningModule, its nets (mlp, cnn, vit) and safe checkpoint loading of any LightningModule."""

from lp_lightning.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_classifier,
    load_module,
    load_weights,
    read_checkpoint,
)
from lp_lightning.models.classifier import Classifier
from lp_lightning.models.nets import NETS, build_net

__all__ = [
    "NETS",
    "CheckpointError",
    "Classifier",
    "build_net",
    "load_checkpoint",
    "load_classifier",
    "load_module",
    "load_weights",
    "read_checkpoint",
]
