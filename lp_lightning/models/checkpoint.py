"""Load untrusted checkpoints safely (weights_only) and rebuild the Classifier and its datamodule."""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lp_lightning.cli import one_line
from lp_lightning.data import TensorDataModule, build_datamodule
from lp_lightning.models.classifier import Classifier

# Plugins that change the module structure store their config in the checkpoint under their class
# name; each provides ``restore_module(module, state) -> module`` rebuilding that structure.
STRUCTURAL_PLUGINS = {"FakeQuantPrecision": "lp_lightning.precision.fake_quant"}


def structural_config(ckpt: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The config a structural plugin ``name`` recorded in ``ckpt`` (``ckpt[name]["config"]``), or None."""
    state = ckpt.get(name)
    config = state.get("config") if isinstance(state, Mapping) else None
    return dict(config) if isinstance(config, Mapping) else None


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe or lacks what the tools need."""


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file and the cause.

    A checkpoint that carries pickled objects (which could run code) is refused; nothing in it runs.
    """
    file = Path(path)
    if file.is_dir():
        raise CheckpointError(f"checkpoint {str(file)!r} is a directory; pass the .ckpt file inside it")
    if not file.is_file():
        raise CheckpointError(f"checkpoint {str(file)!r} does not exist")
    if file.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(file)!r} is empty")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {str(file)!r} was refused: it is corrupt or carries pickled objects that are not "
            f"plain tensors/containers, and is loaded with weights_only=True ({first})"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"checkpoint {str(file)!r} is corrupt or not a torch checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {str(file)!r} has no 'state_dict': not a Lightning checkpoint")
    if not ckpt.get("hyper_parameters"):
        raise CheckpointError(
            f"checkpoint {str(file)!r} has no saved hyperparameters: it was not written by lp-train/Classifier"
        )
    return ckpt


def restore_structure(model: Classifier, ckpt: dict[str, Any]) -> Classifier:
    """Re-apply module swaps of structural plugins recorded in ``ckpt`` so the state dict fits."""
    for key, module_name in STRUCTURAL_PLUGINS.items():
        if key in ckpt:
            plugin_cls = getattr(importlib.import_module(module_name), key)
            model = plugin_cls.restore_module(model, ckpt[key])
    return model


def load_classifier(path: str | os.PathLike[str]) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the trained Classifier (fp32, eval mode) and return it with the raw checkpoint."""
    ckpt = read_checkpoint(path)
    try:
        model = Classifier(**ckpt["hyper_parameters"])
        model = restore_structure(model, ckpt)
        state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        cause = one_line(exc, limit=400)  # a state-dict error has its cause on the second line
        raise CheckpointError(f"checkpoint {str(path)!r} does not rebuild a Classifier: {cause}") from exc
    return model.float().eval(), ckpt


def datamodule_from_hparams(hparams: dict[str, Any], source: str | os.PathLike[str] | None = None,
                            **overrides: Any) -> TensorDataModule:
    """The datamodule a checkpoint was trained on (``hparams["data"]``), with optional overrides.

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
