"""lp_lightning: low-precision training for PyTorch Lightning, with numerical audits and ONNX export."""

from lp_lightning.batches import BatchKeys
from lp_lightning.callbacks import EpsilonGuard, NumericsMonitor, ToleranceAudit
from lp_lightning.data import Cifar10DataModule, DigitsDataModule, SyntheticDataModule
from lp_lightning.models import Classifier, load_checkpoint, load_classifier, load_weights
from lp_lightning.precision import FakeQuantPrecision, Float8Precision, PureHalfPrecision

__version__ = "0.1.0"

__all__ = [
    "BatchKeys",
    "Cifar10DataModule",
    "Classifier",
    "DigitsDataModule",
    "EpsilonGuard",
    "FakeQuantPrecision",
    "Float8Precision",
    "NumericsMonitor",
    "PureHalfPrecision",
    "SyntheticDataModule",
    "ToleranceAudit",
    "__version__",
    "load_checkpoint",
    "load_classifier",
    "load_weights",
]
