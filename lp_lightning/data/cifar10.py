"""CIFAR-10 from a local directory of the standard python batches; it never downloads."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lp_lightning.data.base import TensorDataModule, seeded_split

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds only numpy arrays and plain containers: a batch file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch {str(path)!r} is missing")
    try:
        with path.open("rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:  # any decoding problem is a malformed file
        raise ValueError(
            f"CIFAR-10 batch {str(path)!r} is malformed ({exc}); expected the python pickle format "
            "with keys b'data' (N x 3072 uint8) and b'labels' (N ints)"
        ) from exc
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(
            f"CIFAR-10 batch {str(path)!r} is malformed: data shape {data.shape}, {len(labels)} labels; "
            "expected data (N, 3072) and N labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"CIFAR-10 batch {str(path)!r} has labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


class Cifar10DataModule(TensorDataModule):
    """CIFAR-10 read from ``data_dir`` (the ``cifar-10-batches-py`` folder or its parent).

    Train and val come from ``data_batch_1..5`` (seeded split); test is ``test_batch``.
    """

    num_classes = 10
    input_shape = (3, 32, 32)

    def __init__(self, data_dir: str | None = None, normalize: bool = True, **kwargs) -> None:
        if kwargs.setdefault("test_fraction", 0.0) != 0.0:  # the test split is the official test_batch
            raise ValueError(f"test_fraction={kwargs['test_fraction']!r} is not used by cifar10: its test split is "
                             "test_batch (10,000 images); set val_fraction to split the training batches")
        super().__init__(**kwargs)
        if not data_dir:
            raise ValueError("data_dir is required for cifar10: the folder with data_batch_1..5 and test_batch")
        self.data_dir = str(data_dir)
        self.normalize = normalize

    def resolve_dir(self) -> Path:
        """The folder that holds the batch files, or a clear error saying what was expected where."""
        root = Path(self.data_dir).expanduser()
        for candidate in (root, root / "cifar-10-batches-py"):
            if (candidate / TEST_FILE).is_file():
                return candidate
        raise FileNotFoundError(
            f"data_dir={self.data_dir!r} holds no CIFAR-10 python batches: expected files "
            f"{', '.join(TRAIN_FILES)} and {TEST_FILE} in it or in its cifar-10-batches-py/ subfolder "
            "(the archive from https://www.cs.toronto.edu/~kriz/cifar.html, unpacked; nothing is downloaded)"
        )

    def _to_tensor(self, data: np.ndarray) -> torch.Tensor:
        images = torch.from_numpy(data).float() / 255.0
        return (images - _MEAN) / _STD if self.normalize else images

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        folder = self.resolve_dir()
        parts = [read_batch(folder / name) for name in TRAIN_FILES]
        data = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return self._to_tensor(data), torch.from_numpy(labels)

    def split(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, TensorDataset]:
        train, val, _ = seeded_split(len(labels), self.val_fraction, 0.0, self.seed)
        test_data, test_labels = read_batch(self.resolve_dir() / TEST_FILE)
        return {
            "train": TensorDataset(images[train], labels[train]),
            "val": TensorDataset(images[val], labels[val]),
            "test": TensorDataset(self._to_tensor(test_data), torch.from_numpy(test_labels)),
        }
