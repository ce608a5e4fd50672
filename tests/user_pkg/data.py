"""A user's DataModules over scikit-learn's digits: dict batches, 3-tuples, regression targets."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


def _digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32) / 16.0  # (N, 8, 8): rows are a sequence
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[order], y[order], order


class _Rows(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, layout: str,
                 input_key: str, target_key: str) -> None:
        self.x, self.y, self.idx, self.layout = x, y, idx, layout
        self.input_key, self.target_key = input_key, target_key

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        if self.layout == "dict":
            return {self.input_key: self.x[i], self.target_key: self.y[i], "index": self.idx[i]}
        if self.layout == "triple":
            return self.x[i].unsqueeze(0), self.y[i], self.idx[i]
        return self.x[i].reshape(-1), self.y[i].float().unsqueeze(0) / 9.0  # regression: label in [0, 1]


class DigitsRows(L.LightningDataModule):
    """Digits as the user's own DataModule. ``layout``: ``"dict"`` ({image, label, index} rows (8, 8)),
    ``"triple"`` ((x (1, 8, 8), y, index)) or ``"regression"`` ((x (64,), y/9 (1,)))."""

    def __init__(self, layout: str = "dict", batch_size: int = 64, seed: int = 0,
                 input_key: str = "image", target_key: str = "label") -> None:
        super().__init__()
        if layout not in ("dict", "triple", "regression"):
            raise ValueError(f"layout={layout!r}; allowed: dict, triple, regression")
        self.save_hyperparameters()
        self.sets: dict[str, _Rows] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        hp = self.hparams
        x, y, idx = _digits(hp.seed)
        cuts = {"train": slice(0, 1257), "val": slice(1257, 1527), "test": slice(1527, None)}
        self.sets = {k: _Rows(x[c], y[c], idx[c], hp.layout, hp.input_key, hp.target_key) for k, c in cuts.items()}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        self.setup()
        return DataLoader(self.sets[split], batch_size=self.hparams.batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(self.hparams.seed) if shuffle else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
