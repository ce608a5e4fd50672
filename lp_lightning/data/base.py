"""Shared LightningDataModule over in-memory tensors with a seeded train/val/test split."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


def seeded_split(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Deterministic permutation of ``range(n)`` cut into train/val/test index tensors."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value!r} must be in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction = {val_fraction + test_fraction} must be < 1")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


class TensorDataModule(L.LightningDataModule):
    """Base for datamodules whose whole dataset fits in memory as ``(images, labels)`` tensors.

    Subclasses implement :meth:`load` and set ``num_classes`` and ``input_shape``.
    """

    num_classes: int
    input_shape: tuple[int, ...]

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        self.batch_size = batch_size
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.num_workers = num_workers
        self._splits: dict[str, TensorDataset] = {}

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return all images (N, *input_shape) float32 and labels (N,) int64."""
        raise NotImplementedError

    def split(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, TensorDataset]:
        """Seeded train/val/test split of one pool; subclasses with a fixed test set override."""
        train, val, test = seeded_split(len(labels), self.val_fraction, self.test_fraction, self.seed)
        return {name: TensorDataset(images[i], labels[i]) for name, i in (("train", train), ("val", val),
                                                                            ("test", test))}

    def setup(self, stage: str | None = None) -> None:
        if not self._splits:
            images, labels = self.load()
            self._splits = self.split(images, labels)

    def dataset(self, split: str) -> TensorDataset:
        """The ``train``, ``val`` or ``test`` split (loads on first use)."""
        self.setup()
        return self._splits[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
