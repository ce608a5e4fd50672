"""Fake-quant Linear/Conv1d/Conv2d: subclasses of the torch layers (same ``weight``/``bias`` keys).

Each layer fake-quantizes its INPUT (asymmetric per-tensor int8, moving-average observer) and its weight
(symmetric int8/int4, per output channel or per group) with torch's own fake-quantize ops, whose
backward is the straight-through estimator. All qparams are buffers (``weight_scale``,
``weight_zero_point``, ``act_observer.{min_val,max_val,scale,zero_point,frozen}``).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lp_lightning.quant.input_quant import attach_input_quant
from lp_lightning.quant.observer import MovingAverageMinMaxObserver
from lp_lightning.quant.qparams import fake_quantize_weight, symmetric_weight_scale
from lp_lightning.quant.spec import QuantSpec

_QUANT_ATTRS = ("spec", "layer_name", "act_observer")
_QUANT_BUFFERS = ("weight_scale", "weight_zero_point")


class FakeQuantModule(nn.Module):
    """Mixin shared by the fake-quant layers; ``float_cls`` is the plain torch type it replaces."""

    float_cls: type[nn.Module]
    spec: QuantSpec
    layer_name: str
    weight: nn.Parameter
    act_observer: MovingAverageMinMaxObserver | None

    @classmethod
    def from_float(cls, module: nn.Module, spec: QuantSpec, name: str = "<layer>") -> FakeQuantModule:
        """A fake-quant layer sharing ``module``'s parameters (``module`` itself is not changed).

        Raises ValueError naming ``name`` and the value when ``spec`` does not fit the layer.
        """
        if type(module) is not cls.float_cls:
            raise TypeError(f"layer {name!r}: {cls.__name__}.from_float needs a {cls.float_cls.__name__}, "
                            f"got {type(module).__name__}")
        spec.check(name)
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new._parameters = dict(module._parameters)
        new._buffers = dict(module._buffers)
        new._modules = dict(module._modules)
        new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
        new._setup_quant(spec, name)
        return new

    def _group_length(self) -> int:
        """Number of weights per output channel (the reduction length K)."""
        return self.weight[0].numel()

    @classmethod
    def layer_spec(cls, spec: QuantSpec) -> QuantSpec:
        """``spec`` as this layer type applies it: Conv layers stay per channel (no per-group int4 conv kernels)."""
        if spec.granularity == "per_group" and not issubclass(cls, nn.Linear):
            spec = replace(spec, granularity="per_channel", group_size=None)
        if spec.granularity == "per_channel":
            spec = replace(spec, group_size=None)
        return spec

    def _setup_quant(self, spec: QuantSpec, name: str) -> None:
        spec = self.layer_spec(spec)
        out, k = self.weight.shape[0], self._group_length()
        if spec.group_size is not None and k % spec.group_size:
            raise ValueError(f"layer {name!r}: group_size={spec.group_size} does not divide its in_features={k}; "
                             f"pick a divisor of {k} or skip the layer (skip=[{name!r}])")
        self.spec = spec
        self.layer_name = name
        shape = (out,) if spec.group_size is None else (out, k // spec.group_size)
        factory = {"device": self.weight.device}
        self.register_buffer("weight_scale", torch.ones(shape, dtype=torch.float32, **factory))
        self.register_buffer("weight_zero_point", torch.zeros(shape, dtype=torch.int32, **factory))
        if spec.act_bits is None:
            self.act_observer = None
        else:
            self.act_observer = MovingAverageMinMaxObserver(spec.act_bits, spec.averaging_constant).to(
                self.weight.device)

    def quantize_input(self, x: Tensor) -> Tensor:
        """Observe (training, not frozen) then fake-quantize the input; pass-through before any observation."""
        obs = self.act_observer
        if obs is None:
            return x
        if self.training:
            obs.observe(x)
        if not obs.initialized:
            return x
        if obs.measure:
            obs.record_clipping(x)
        return obs.fake_quantize(x)

    def quantized_weight(self) -> Tensor:
        """The weight on its grid (scales recomputed from the current weight and stored in ``weight_scale``)."""
        spec = self.spec
        scale = symmetric_weight_scale(self.weight, spec.weight_bits, spec.group_size)
        with torch.no_grad():
            self.weight_scale.copy_(scale)
        return fake_quantize_weight(self.weight, scale, self.weight_zero_point, spec.weight_bits, spec.group_size)

    def quant_state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """The entries of this layer's state dict that a plain ``float_cls`` layer lacks (qparam buffers)."""
        state = {prefix + name: self._buffers[name].detach() for name in _QUANT_BUFFERS}
        if self.act_observer is not None:
            state.update(self.act_observer.state_dict(prefix=prefix + "act_observer."))
        return state

    def freeze_observer(self, frozen: bool = True) -> None:
        if self.act_observer is not None:
            self.act_observer.freeze(frozen)

    def qparams(self) -> dict[str, Any]:
        """The layer's qparams in the export format (plain python values and CPU tensors)."""
        spec = self.spec
        scale = symmetric_weight_scale(self.weight, spec.weight_bits, spec.group_size)
        obs = self.act_observer
        active = obs is not None and obs.initialized
        return {
            "weight_scale": scale.cpu(),
            "weight_zero_point": torch.zeros(scale.shape, dtype=torch.int32),
            "bits": spec.weight_bits,
            "granularity": spec.granularity,
            "group_size": spec.group_size,
            "act_scale": float(obs.scale) if active else None,
            "act_zero_point": int(obs.zero_point) if active else None,
            "act_bits": obs.bits if active else None,
        }

    def to_float(self, snap: bool = True, activations: bool = False) -> nn.Module:
        """A NEW plain ``float_cls`` layer; ``snap=True`` puts the weight on its quantization grid;
        ``activations=True`` keeps the input's fake quantization with the learned qparams (``input_quant``),
        so the layer computes what this one computes in eval mode."""
        plain = copy.deepcopy(self)
        for buf in _QUANT_BUFFERS:
            plain._buffers.pop(buf, None)
        plain._modules.pop("act_observer", None)
        for attr in _QUANT_ATTRS:
            plain.__dict__.pop(attr, None)
        if snap:
            with torch.no_grad():
                plain.weight.copy_(self.quantized_weight())
        plain.__class__ = self.float_cls
        obs = self.act_observer
        if activations and obs is not None and obs.initialized:
            attach_input_quant(plain, obs.scale, obs.zero_point, obs.bits)
        return plain

    def extra_repr(self) -> str:
        s = self.spec
        w = f"w=int{s.weight_bits} {s.granularity}" + (f"(group_size={s.group_size})" if s.group_size else "")
        a = f"a=int{s.act_bits}" if s.act_bits else "a=float"
        return f"{super().extra_repr()}, {w}, {a}"


class FakeQuantLinear(FakeQuantModule, nn.Linear):
    """``nn.Linear`` with fake-quantized input and weight."""

    float_cls = nn.Linear

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


class FakeQuantConv1d(FakeQuantModule, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized input and per-output-channel weight."""

    float_cls = nn.Conv1d

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


class FakeQuantConv2d(FakeQuantModule, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized input and per-output-channel weight."""

    float_cls = nn.Conv2d

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


FAKE_QUANT_TYPES: dict[type[nn.Module], type[FakeQuantModule]] = {
    nn.Linear: FakeQuantLinear, nn.Conv1d: FakeQuantConv1d, nn.Conv2d: FakeQuantConv2d,
}
