"""The DataModule a checkpoint was trained on: a Hydra ``_target_`` node, or the checkpoint's own record."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import lightning as L

from lp_lightning.cli import one_line
from lp_lightning.data import TensorDataModule, build_datamodule
from lp_lightning.models.checkpoint import CheckpointError, import_class, instantiate_from, takes_any_keyword


def datamodule_from_hparams(hparams: dict[str, Any], source: str | os.PathLike[str] | None = None,
                            **overrides: Any) -> TensorDataModule:
    """The built-in datamodule an lp-train checkpoint was trained on (``hparams["data"]``), with overrides.

    A ``data`` entry that builds no datamodule is a CheckpointError naming ``source`` (the checkpoint).
    """
    data = hparams.get("data") or {"name": "digits"}
    where = f"checkpoint {str(source)!r}: " if source is not None else ""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}hyper_parameters.data={data!r} is not a mapping of datamodule settings")
    data = dict(data)
    name = data.pop("name", "digits")
    data.update(overrides)
    try:
        return build_datamodule(name, **data)
    except (TypeError, ValueError) as exc:
        cause = one_line(exc, limit=400)
        raise CheckpointError(f"{where}hyper_parameters.data does not build a datamodule: {cause}") from exc


def build_data(ckpt: Mapping[str, Any], data: Mapping[str, Any] | None, source: str | os.PathLike[str]
               ) -> L.LightningDataModule:
    """The DataModule for checkpoint ``ckpt`` (read from ``source``).

    ``data`` with ``_target_`` (a class path, like lp-train's ``data`` group): that class, built from the
    hyperparameters the checkpoint saved for it (``datamodule_hyper_parameters``, when the DataModule called
    ``save_hyperparameters``) updated with the other keys of ``data``. Without ``_target_``: the built-in
    datamodule of an lp-train checkpoint, its settings updated with ``data`` (e.g. ``batch_size``).
    """
    settings = {k: v for k, v in (data or {}).items() if k != "_target_" and v is not None}
    target = (data or {}).get("_target_")
    if not target:
        if not (ckpt.get("hyper_parameters") or {}).get("data") and "datamodule_hyper_parameters" in ckpt:
            raise ValueError(f"checkpoint {str(source)!r} was trained on a DataModule of the user's: give its class "
                             "with data._target_=pkg.module.MyDataModule")
        return datamodule_from_hparams(dict(ckpt.get("hyper_parameters") or {}), source, **settings)
    cls = import_class(str(target), L.LightningDataModule, "data._target_")
    params = inspect.signature(cls.__init__).parameters
    if not takes_any_keyword(cls):
        unknown = sorted(set(settings) - set(params))
        if unknown:
            raise ValueError(f"data.{unknown[0]} is not an argument of {target}; its arguments: "
                             f"{[p for p in params if p != 'self']}")
    saved = dict(ckpt.get("datamodule_hyper_parameters") or {})
    try:
        return instantiate_from(cls, {"datamodule_hyper_parameters": {**saved, **settings}},
                                "datamodule_hyper_parameters")
    except (TypeError, ValueError) as exc:
        cause = one_line(exc, limit=400)
        have = f" (the checkpoint saved {sorted(saved)})" if saved else " (the checkpoint saved none)"
        raise ValueError(f"data._target_={target!r} cannot be built from {sorted({**saved, **settings})}{have}: "
                         f"{cause}; pass its arguments as data.<name>=...") from exc
