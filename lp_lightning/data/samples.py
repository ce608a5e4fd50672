"""Inputs and targets of a split of any LightningDataModule, as tensors (for export and the audits)."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lp_lightning.batches import BatchKeys

STAGES = {"train": ("fit", "train_dataloader"), "val": ("validate", "val_dataloader"),
          "test": ("test", "test_dataloader")}


def split_loader(datamodule: L.LightningDataModule, split: str) -> DataLoader:
    """The ``train``, ``val`` or ``test`` dataloader of ``datamodule`` (after its ``setup`` for that stage)."""
    if split not in STAGES:
        raise ValueError(f"split={split!r} is not allowed; use one of {list(STAGES)}")
    stage, method = STAGES[split]
    datamodule.setup(stage)
    try:
        loader = getattr(datamodule, method)()
    except NotImplementedError as exc:
        raise ValueError(f"{type(datamodule).__name__} has no {method}(): choose another split") from exc
    except Exception as exc:  # Lightning's default hooks raise MisconfigurationException
        if "must be implemented" in str(exc) or "not implemented" in str(exc).lower():
            raise ValueError(f"{type(datamodule).__name__} has no {method}(): choose another split") from exc
        raise
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    elif isinstance(loader, dict):
        loader = next(iter(loader.values()))
    return loader


def collect(loader: DataLoader, keys: BatchKeys, max_samples: int | None = None,
            need_targets: bool = False) -> tuple[Tensor, Tensor | None]:
    """``(inputs, targets)`` of ``loader`` concatenated (at most ``max_samples``); targets None when the batches
    carry none (or they are not class labels of shape (N,)), unless ``need_targets``."""
    xs, ys, n = [], [], 0
    for batch in loader:
        x, y = keys.split(batch)
        take = len(x) if max_samples is None else min(len(x), max_samples - n)
        xs.append(x[:take])
        ys.append(None if y is None else y[:take])
        n += take
        if max_samples is not None and n >= max_samples:
            break
    if not xs:
        raise ValueError("the dataloader yielded no batches")
    labels = None
    if all(y is not None and y.ndim == 1 and not y.is_floating_point() for y in ys):
        labels = torch.cat(ys)  # type: ignore[arg-type]
    elif need_targets:
        raise ValueError("the batches carry no class labels of shape (N,): set target_key / target_index")
    return torch.cat(xs), labels
