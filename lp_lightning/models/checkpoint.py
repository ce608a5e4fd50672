"""Load untrusted checkpoints safely (weights_only) and rebuild any LightningModule and its DataModule.

A module is rebuilt the way ``MyModule.load_from_checkpoint`` does it (the hyperparameters saved by
``save_hyperparameters`` are its arguments), plus the module swaps of structural plugins (fake-quant), so a
checkpoint written under ``FakeQuantPrecision`` comes back as the fake-quant module it trained.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch

from lp_lightning.cli import one_line

# Plugins that change the module structure store their config in the checkpoint under their class
# name; each provides ``restore_module(module, state) -> module`` rebuilding that structure.
STRUCTURAL_PLUGINS = {"FakeQuantPrecision": "lp_lightning.precision.fake_quant"}
# LightningCLI records how to rebuild nested class_path arguments; the only instantiator trusted here.
TRUSTED_INSTANTIATORS = ("lightning.pytorch.cli.instantiate_module",)

M = TypeVar("M", bound=L.LightningModule)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the class it is loaded into."""


def structural_config(ckpt: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The config a structural plugin ``name`` recorded in ``ckpt`` (``ckpt[name]["config"]``), or None."""
    state = ckpt.get(name)
    config = state.get("config") if isinstance(state, Mapping) else None
    return dict(config) if isinstance(config, Mapping) else None


def import_class(path: str, base: type, arg: str) -> type:
    """The class named by the dotted ``path``, checked to subclass ``base``; one-line ValueError naming ``arg``."""
    if not isinstance(path, str) or "." not in path.strip("."):
        raise ValueError(f"{arg}={path!r} must be a dotted class path such as pkg.module.My"
                         f"{base.__name__.removeprefix('Lightning')}")
    module_name, _, name = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), name)
    except ImportError as exc:
        raise ValueError(f"{arg}={path!r} does not import: {one_line(exc)} (is the package installed or on "
                         "PYTHONPATH?)") from exc
    except AttributeError as exc:
        raise ValueError(f"{arg}={path!r} does not import: module {module_name!r} has no {name!r}") from exc
    if not isinstance(obj, type) or not issubclass(obj, base):
        kind = obj.__name__ if isinstance(obj, type) else type(obj).__name__
        raise ValueError(f"{arg}={path!r} is a {kind}, not a subclass of {base.__module__}.{base.__qualname__}")
    return obj


def class_path(cls: type) -> str:
    """``module.QualName`` of ``cls`` (what ``import_class`` takes)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def model_id(module: L.LightningModule) -> str:
    """How reports name a model: the built-in Classifier's net (``cnn``), else the module's class path."""
    from lp_lightning.models.classifier import Classifier

    return str(module.hparams.net) if isinstance(module, Classifier) else class_path(type(module))


def takes_any_keyword(cls: type) -> bool:
    """Whether ``cls.__init__`` has ``**kwargs`` (then every saved or given argument is passed on)."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())


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
    return ckpt


def _init_kwargs(cls: type, saved: Mapping[str, Any], name: str | None) -> dict[str, Any]:
    """``cls.__init__`` arguments from saved hyperparameters, as Lightning's ``_load_state`` builds them."""
    params = inspect.signature(cls.__init__).parameters
    if name and name in params:  # save_hyperparameters(hparams) of one Namespace/dict argument
        return {name: dict(saved)}
    if takes_any_keyword(cls):
        return dict(saved)
    return {k: v for k, v in saved.items() if k in params and k != "self"}


def instantiate_from(cls: type[Any], ckpt: Mapping[str, Any], key: str) -> Any:
    """``cls`` built from the hyperparameters a checkpoint saved under ``key`` (module or datamodule)."""
    saved = dict(ckpt.get(key) or {})
    instantiator = saved.pop("_instantiator", None)
    saved.pop("_class_path", None)
    kwargs = _init_kwargs(cls, saved, ckpt.get(cls.CHECKPOINT_HYPER_PARAMS_NAME) if key == "hyper_parameters" else None)
    if instantiator is None:
        return cls(**kwargs)
    if instantiator not in TRUSTED_INSTANTIATORS:
        raise CheckpointError(f"the checkpoint asks for instantiator {instantiator!r}, which is not trusted "
                              f"(allowed: {list(TRUSTED_INSTANTIATORS)})")
    module_name, _, name = instantiator.rpartition(".")
    return getattr(importlib.import_module(module_name), name)(cls, kwargs)


def restore_structure(model: M, ckpt: Mapping[str, Any]) -> M:
    """Re-apply module swaps of structural plugins recorded in ``ckpt`` so its state dict fits ``model``."""
    for key, module_name in STRUCTURAL_PLUGINS.items():
        if key in ckpt:
            plugin_cls = getattr(importlib.import_module(module_name), key)
            model = plugin_cls.restore_module(model, ckpt[key])
    return model


def _full_state(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's state dict plus the module state structural plugins keep beside it."""
    state = dict(ckpt["state_dict"])
    for key in STRUCTURAL_PLUGINS:
        extra = ckpt.get(key)
        if isinstance(extra, Mapping) and isinstance(extra.get("module_state"), Mapping):
            state.update(extra["module_state"])
    return state


def module_from_checkpoint(cls: type[M], ckpt: Mapping[str, Any], source: str | os.PathLike[str]) -> M:
    """``cls`` rebuilt from a read checkpoint (hyperparameters, ``on_load_checkpoint``, plugin structure,
    weights, strictly); a checkpoint that does not fit is one CheckpointError naming file, class and cause."""
    try:
        model = instantiate_from(cls, ckpt, "hyper_parameters")
        if type(model).configure_model is not L.LightningModule.configure_model:
            model.configure_model()
        model.on_load_checkpoint(dict(ckpt))
        model = restore_structure(model, ckpt)
        model.load_state_dict(_full_state(ckpt), strict=True)
    except CheckpointError:
        raise
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        cause = one_line(exc, limit=400)  # a state-dict error has its cause on the second line
        raise CheckpointError(f"checkpoint {str(source)!r} does not fit {class_path(cls)}: {cause}") from exc
    return model


def load_checkpoint(cls: type[M], path: str | os.PathLike[str]) -> M:
    """``cls.load_from_checkpoint(path)`` for checkpoints of any precision plugin, fake-quant included.

    Reads with ``weights_only=True`` (pickled objects are refused), builds ``cls`` from the saved
    hyperparameters, re-applies ``FakeQuantPrecision``'s layer swaps with its recorded observers and scales,
    and loads the weights strictly. The module is returned in float32 and eval mode, on the CPU.
    """
    model = module_from_checkpoint(cls, read_checkpoint(path), path)
    return model.float().eval()


def load_weights(module: M, path: str | os.PathLike[str]) -> M:
    """Initialize ``module``'s weights from checkpoint ``path`` (weights only: no optimizer, schedule or epoch
    state; read with ``weights_only=True``), strictly; e.g. a trained fp32 model before QAT fine-tuning.

    A fake-quant checkpoint gives its latent float weights. Weights that do not fit are one CheckpointError
    naming the file and the cause. Returns ``module``.
    """
    ckpt = read_checkpoint(path)
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"init_from checkpoint {str(path)!r} does not fit {class_path(type(module))}: "
                              f"{one_line(exc, limit=400)}") from exc
    return module


def load_module(path: str | os.PathLike[str], model_class: str | type[L.LightningModule] | None = None
                ) -> tuple[L.LightningModule, dict[str, Any]]:
    """The module of checkpoint ``path`` (float32, eval mode) and the raw checkpoint.

    ``model_class``: the LightningModule class or its dotted path; None: the built-in Classifier (lp-train).
    """
    if model_class is None:
        from lp_lightning.models.classifier import Classifier

        cls: type[L.LightningModule] = Classifier
    elif isinstance(model_class, str):
        cls = import_class(model_class, L.LightningModule, "model_class")
    else:
        cls = model_class
    ckpt = read_checkpoint(path)
    if model_class is None and not ckpt.get("hyper_parameters"):
        raise CheckpointError(f"checkpoint {str(path)!r} has no saved hyperparameters: it was not written by "
                              "lp-train; give its class with model_class=pkg.module.MyModule")
    return module_from_checkpoint(cls, ckpt, path).float().eval(), ckpt


def load_classifier(path: str | os.PathLike[str]) -> tuple[L.LightningModule, dict[str, Any]]:
    """The built-in Classifier of an lp-train checkpoint (float32, eval mode) and the raw checkpoint."""
    return load_module(path)
