"""Fail-fast checks of a model prepared for QAT, each naming the layers: eval-mode layers at the first training
step, observers that saw no data, layers of a quantizable kind that could not be swapped."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lp_lightning.quant.batchnorm import batchnorm_layers
from lp_lightning.quant.modules import FAKE_QUANT_TYPES, FakeQuantModule
from lp_lightning.quant.swap import fake_quant_layers, matches

_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.ConvTranspose3d)


def eval_mode_layers(model: nn.Module) -> list[str]:
    """Fake-quant and BatchNorm layers of ``model`` that are in eval mode (their ranges/statistics never update)."""
    layers = {**fake_quant_layers(model), **batchnorm_layers(model)}
    return [name or type(m).__name__ for name, m in model.named_modules() if name in layers and not m.training]


def unobserved_layers(model: nn.Module) -> list[str]:
    """Fake-quant layers whose activation observer has seen no data."""
    return [n for n, m in fake_quant_layers(model).items()
            if m.act_observer is not None and not m.act_observer.initialized]


def unquantizable_layers(model: nn.Module, skip: Sequence[str] = ()) -> dict[str, str]:
    """Linear/Conv-like layers that are not skipped but stay float, with the reason (a subclass of a supported
    type, a kind without a fake-quant version). Layers inside ``nn.MultiheadAttention`` (which reads
    ``out_proj.weight`` directly) are left out."""
    inside_mha = {f"{n}.{c}" if n else c for n, m in model.named_modules()
                  if isinstance(m, nn.MultiheadAttention) for c, _ in m.named_modules() if c}
    found: dict[str, str] = {}
    for name, m in model.named_modules():
        if (isinstance(m, FakeQuantModule) or not isinstance(m, _KINDS) or name in inside_mha
                or matches(name, skip)):
            continue
        base = next((t for t in FAKE_QUANT_TYPES if isinstance(m, t)), None)
        found[name] = (f"{type(m).__name__} subclasses {base.__name__} (only exact {base.__name__} layers are swapped)"
                       if base else f"{type(m).__name__} has no fake-quant version "
                       f"(supported: {', '.join(t.__name__ for t in FAKE_QUANT_TYPES)})")
    return found
