"""LightningDataModules: digits (default, bundled with scikit-learn), cifar10 (local dir), synthetic."""

from lp_lightning.data.base import TensorDataModule
from lp_lightning.data.cifar10 import Cifar10DataModule
from lp_lightning.data.digits import DigitsDataModule
from lp_lightning.data.synthetic import SyntheticDataModule

DATAMODULES: dict[str, type[TensorDataModule]] = {
    "digits": DigitsDataModule,
    "cifar10": Cifar10DataModule,
    "synthetic": SyntheticDataModule,
}


def build_datamodule(name: str, **kwargs) -> TensorDataModule:
    """Instantiate a datamodule by its config name (``digits``, ``cifar10``, ``synthetic``)."""
    if name not in DATAMODULES:
        raise ValueError(f"data={name!r} is unknown; allowed: {sorted(DATAMODULES)}")
    return DATAMODULES[name](**kwargs)


__all__ = [
    "DATAMODULES",
    "Cifar10DataModule",
    "DigitsDataModule",
    "SyntheticDataModule",
    "TensorDataModule",
    "build_datamodule",
]
