"""The fake-quant-only part of a model's state dict: list it, load it, and let plain state dicts load.

A fake-quant layer's state dict is its plain layer's (``weight``, ``bias``) plus qparam buffers
(``weight_scale``, ``weight_zero_point``, ``act_observer.*``). ``quant_state_dict`` lists those extra
entries by fully-qualified name, computed from the layers themselves (no name matching), so a checkpoint
can keep them apart and its ``state_dict`` loads into the plain model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lp_lightning.quant.swap import fake_quant_layers


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def quant_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state-dict entries that its plain (unconverted) version lacks, by fully-qualified key."""
    state: dict[str, Tensor] = {}
    for name, layer in fake_quant_layers(model).items():
        state.update(layer.quant_state_dict(_prefix(name)))
    return state


def _fill_quant_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: fake-quant entries the incoming (plain) state dict lacks keep their values."""
    for key, value in quant_state_dict(module).items():
        state_dict.setdefault(prefix + key, value)


def accept_plain_state_dicts(model: nn.Module) -> None:
    """Let ``model`` (converted) load state dicts without its fake-quant entries, strictly: the missing
    entries keep their current values. Registers one load-state-dict pre-hook; calling again adds none."""
    hooks = model._load_state_dict_pre_hooks.values()
    if not any(getattr(hook, "hook", None) is _fill_quant_state for hook in hooks):
        model.register_load_state_dict_pre_hook(_fill_quant_state)


def _layer_of(key: str) -> str:
    head, sep, _ = key.rpartition(".act_observer.")
    return head if sep else ("" if key.startswith("act_observer.") else key.rpartition(".")[0])


def load_quant_state(model: nn.Module, state: Mapping[str, Tensor], owner: str = "load_quant_state") -> None:
    """Load ``state`` (as from ``quant_state_dict``) into ``model``'s fake-quant layers, in place.

    Raises ValueError naming the layers when a key is missing or has no fake-quant layer, or a shape differs.
    """
    layers = fake_quant_layers(model)
    expected = quant_state_dict(model)
    missing = sorted({_layer_of(k) for k in expected if k not in state})
    extra = sorted({_layer_of(k) for k in state if k not in expected})
    if missing or extra:
        raise ValueError(f"{owner}: the saved fake-quant state does not fit {type(model).__name__}: "
                         f"layer(s) {missing} have no saved qparams, saved qparams of {extra} have no fake-quant "
                         "layer here (was it trained with another skip list or model?)")
    for name, layer in layers.items():
        prefix = _prefix(name)
        own = {k[len(prefix):]: state[k] for k in layer.quant_state_dict(prefix)}
        try:
            layer.load_state_dict(own, strict=False)  # only the qparams; the observer refreshes its flags
        except RuntimeError as exc:
            cause = " ".join(str(exc).split())
            raise ValueError(f"{owner}: the saved qparams of layer {name!r} do not fit: {cause}") from exc
