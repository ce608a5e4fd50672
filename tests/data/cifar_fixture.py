"""Write a tiny CIFAR-10 directory in the real on-disk format (python pickle batches)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from lp_lightning.data.cifar10 import TEST_FILE, TRAIN_FILES


def write_tiny_cifar(root: Path, per_batch: int = 20, seed: int = 0) -> Path:
    """Create ``root/cifar-10-batches-py`` with 5 train batches and a test batch of ``per_batch`` images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in (*TRAIN_FILES, TEST_FILE):
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)],
        }
        with (folder / name).open("wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    return folder
