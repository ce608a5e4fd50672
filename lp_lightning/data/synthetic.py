"""Random images of any shape and class count, learnable (class-dependent means), for benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lp_lightning.data.base import TensorDataModule


class SyntheticDataModule(TensorDataModule):
    """``num_samples`` images of ``input_shape``: a fixed random pattern per class plus Gaussian noise."""

    def __init__(
        self,
        num_samples: int = 2048,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        noise: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_samples < 1 or num_classes < 1:
            raise ValueError(f"num_samples={num_samples!r} and num_classes={num_classes!r} must be >= 1")
        self.num_samples = num_samples
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = num_classes
        self.noise = noise

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        centers = torch.randn(self.num_classes, *self.input_shape, generator=g)
        labels = torch.randint(0, self.num_classes, (self.num_samples,), generator=g)
        images = centers[labels] + self.noise * torch.randn(self.num_samples, *self.input_shape, generator=g)
        return images, labels
