"""Swap layers to fake-quant in place, and back to plain layers: ``quantize_modules``, ``convert``, ``dequantize``."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from lp_lightning.quant.modules import FAKE_QUANT_TYPES, FakeQuantModule
from lp_lightning.quant.spec import QuantSpec


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True when a pattern names the module ``name`` or a module that contains it.

    A pattern is a fully-qualified name or its trailing dotted part, or a glob: ``"classifier"`` and
    ``"net.classifier"`` both select ``net.classifier`` (and ``net.classifier.0`` inside it), ``"stages.0"``
    every layer of that block, ``"*.attn.*"`` selects by glob.
    """
    dotted = "." + name + "."
    return any(fnmatchcase(name, p) or ("." + p + ".") in dotted for p in patterns)


def fake_quant_layers(model: nn.Module) -> dict[str, FakeQuantModule]:
    """The fake-quant layers of ``model`` by fully-qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantModule)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_modules(model: nn.Module, spec: QuantSpec, skip: Sequence[str] = ()) -> list[str]:
    """Swap every ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` of ``model`` not matched by ``skip``, in place.

    Layers that are already fake-quant with this ``spec`` are kept as they are (so the call is idempotent);
    one with another spec is a ValueError. Every layer is checked before any is swapped, so a ValueError
    (naming the layer and value) leaves ``model`` unchanged. Returns the names of all fake-quant layers of
    ``model`` afterwards.
    """
    swaps: dict[str, FakeQuantModule] = {}
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantModule) and module.spec != module.layer_spec(spec):
            raise ValueError(f"layer {name!r} is already fake-quantized with {module.spec}, not "
                             f"{module.layer_spec(spec)}: quantize a fresh (plain) copy of the model, e.g. "
                             "lp_lightning.quant.dequantize(model)")
        cls = FAKE_QUANT_TYPES.get(type(module))  # exact type: MultiheadAttention.out_proj etc. are left alone
        if cls is None or matches(name, skip):
            continue
        if not name:
            raise ValueError(f"the root module itself is a {type(module).__name__}; wrap it in a container "
                             "(e.g. nn.Sequential) so it can be swapped in place")
        swaps[name] = cls.from_float(module, spec, name)
    for name, new in swaps.items():
        _set_submodule(model, name, new)
    return list(fake_quant_layers(model))


def dequantize(model: nn.Module, snap: bool = False, activations: bool = False) -> nn.Module:
    """A NEW copy of ``model`` with every fake-quant layer back to its plain type (``model`` is untouched).

    ``snap=False`` keeps the trained float weights; ``snap=True`` puts them on their quantization grid.
    ``activations=True`` keeps each layer's input fake quantization with its learned qparams
    (``quant.input_quant``; the state-dict keys stay the plain model's).
    """
    plain = copy.deepcopy(model)
    originals = fake_quant_layers(model)
    if "" in originals:
        return originals[""].to_float(snap, activations)
    for name in fake_quant_layers(plain):
        _set_submodule(plain, name, originals[name].to_float(snap, activations))
    return plain


def convert(model: nn.Module, activations: bool = True) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """The model QAT trained, in plain layers, plus the learned qparams.

    The returned model has the original module types and state-dict keys, weights snapped to their grid,
    BatchNorm as trained (recalibrated by ``BatchNormRecalibration`` when FakeQuantPrecision attached it), and,
    with ``activations=True`` (default), each layer's input quantize/dequantize with the learned qparams, so
    in eval mode it computes exactly what the fake-quant model computes. ``activations=False`` gives the
    plain-float model (snapped weights, float activations) that the ONNX exporter quantizes with the qparams.

    ``qparams[fully_qualified_name]`` = ``{"weight_scale", "weight_zero_point", "bits", "granularity",
    "group_size", "act_scale", "act_zero_point", "act_bits"}`` (see ``FakeQuantModule.qparams``);
    activation entries are None for layers without activation quantization or whose observer never saw data.
    """
    layers = fake_quant_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no fake-quant layers: train it with "
                         "FakeQuantPrecision (or call quantize_modules) before convert()")
    qparams = {name: layer.qparams() for name, layer in layers.items()}
    unobserved = [n for n, layer in layers.items()
                  if layer.act_observer is not None and not layer.act_observer.initialized]
    if unobserved:
        warnings.warn(f"activation observers of {unobserved} never saw data: their act_scale is None", stacklevel=2)
    return dequantize(model, snap=True, activations=activations), qparams
