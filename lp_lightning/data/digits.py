"""scikit-learn's bundled handwritten digits (1797 images, 8x8, 10 classes): the default dataset."""

from __future__ import annotations

import torch

from lp_lightning.data.base import TensorDataModule


class DigitsDataModule(TensorDataModule):
    """The digits set shipped inside scikit-learn; nothing is downloaded. Pixels scaled to [0, 1]."""

    num_classes = 10
    input_shape = (1, 8, 8)

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
        return images, torch.tensor(bunch.target, dtype=torch.int64)
