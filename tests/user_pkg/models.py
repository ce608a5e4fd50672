"""A user's LightningModules: nothing here follows the built-in Classifier's arguments or metric names."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RowTransformer(L.LightningModule):
    """Transformer encoder over the 8 rows of a digit; dict batches ``{"image", "label"}``; logs
    ``valid/accuracy``. Uses ``nn.TransformerEncoderLayer`` (attention, LayerNorm, residuals)."""

    def __init__(self, d_model: int = 32, n_heads: int = 4, layers: int = 1, lr: float = 3e-3,
                 classes: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Linear(8, d_model)
        self.pos = nn.Parameter(torch.zeros(1, 8, d_model))
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=2 * d_model, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, rows: Tensor) -> Tensor:
        h = self.encoder(self.embed(rows) + self.pos)
        return self.head(h.mean(dim=1))

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits = self(batch["image"]).float()
        loss = F.cross_entropy(logits, batch["label"])
        self.log(f"{stage}/loss", loss)
        self.log(f"{stage}/accuracy", (logits.argmax(1) == batch["label"]).float().mean(), prog_bar=True)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "valid")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, eps=1e-3)


class _Block(nn.Module):
    """Residual block: depthwise 3x3 -> pointwise 1x1 -> BatchNorm, added to its input."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.pw = nn.Conv2d(width, width, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn(self.pw(self.dw(x))))


class TinyResNet(L.LightningModule):
    """ResNet-style CNN with BatchNorm, residual adds and a depthwise conv; batches ``(x, y, index)``."""

    def __init__(self, width: int = 16, blocks: int = 2, learning_rate: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer={optimizer!r}; allowed: sgd, adamw")
        self.save_hyperparameters()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*[_Block(width) for _ in range(blocks)])
        self.fc = nn.Linear(width * 16, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.avg_pool2d(self.blocks(self.stem(x)), 2).flatten(1))

    def _step(self, batch: tuple[Tensor, Tensor, Tensor], stage: str) -> Tensor:
        x, y, _ = batch
        logits = self(x).float()
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss)
        self.log(f"{stage}_acc", (logits.argmax(1) == y).float().mean())
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.get("optimizer", "sgd") == "adamw":  # eps 1e-3: safe in fp16 (EpsilonGuard's bound is 2**-12)
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.learning_rate, eps=1e-3, weight_decay=0.01)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.learning_rate, momentum=0.9)


class Regressor(L.LightningModule):
    """A regression net with an (N, 1) output and MSE loss; logs ``valid/mse``."""

    def __init__(self, hidden: int = 32, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self(x).float(), y)
        self.log(f"{stage}/mse", loss)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "valid")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, eps=1e-4)


class DepthwiseSeparableCNN(TinyResNet):
    """Conv2d -> depthwise Conv2d -> pointwise Conv2d -> BatchNorm -> Conv1d (over the pooled positions) ->
    Linear, trained from scratch with SGD (lr 0.05, momentum 0.9); batches ``(x, y, index)``. The held-out
    net of issue 17: one depthwise channel can dominate its layer's activation range. Steps, logging and the
    optimizer are TinyResNet's."""

    def __init__(self, width: int = 16, learning_rate: float = 0.05) -> None:
        L.LightningModule.__init__(self)  # not TinyResNet's layers
        self.save_hyperparameters({"width": width, "learning_rate": learning_rate})
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.pw = nn.Conv2d(width, 2 * width, 1, bias=False)
        self.bn = nn.BatchNorm2d(2 * width)
        self.seq = nn.Conv1d(2 * width, width, 3, padding=1)
        self.fc = nn.Linear(width * 16, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.dw(F.relu(self.conv(x))))
        h = F.avg_pool2d(F.relu(self.bn(self.pw(h))), 2).flatten(2)  # (N, C, 16 positions)
        return self.fc(F.relu(self.seq(h)).flatten(1))
