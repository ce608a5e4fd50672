"""Registry of the nets a Classifier can hold, by config name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lp_lightning.models.cnn import ResNetCNN
from lp_lightning.models.mlp import MLP
from lp_lightning.models.vit import ViT

NETS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": ResNetCNN, "vit": ViT}


def build_net(name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build net ``name`` (``mlp``, ``cnn``, ``vit``) for images of ``input_shape``."""
    if name not in NETS:
        raise ValueError(f"net={name!r} is unknown; allowed: {sorted(NETS)}")
    return NETS[name](input_shape=tuple(input_shape), num_classes=num_classes, **kwargs)
