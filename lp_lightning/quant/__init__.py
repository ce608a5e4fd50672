"""Fake-quant modules, observers and qparams (pure torch), shared by the plugin and the exporter."""

from lp_lightning.quant.fake_quantize import (
    fake_quantize_per_channel,
    fake_quantize_per_tensor,
    torch_fake_quant_ops,
)
from lp_lightning.quant.modules import (
    FAKE_QUANT_TYPES,
    FakeQuantConv1d,
    FakeQuantConv2d,
    FakeQuantLinear,
    FakeQuantModule,
)
from lp_lightning.quant.observer import MovingAverageMinMaxObserver, broadcast_observers
from lp_lightning.quant.qparams import (
    affine_qparams,
    fake_quantize_weight,
    integer_weight,
    symmetric_weight_scale,
)
from lp_lightning.quant.spec import GRANULARITIES, QuantSpec, parse_bits
from lp_lightning.quant.state import accept_plain_state_dicts, load_quant_state, quant_state_dict
from lp_lightning.quant.swap import convert, dequantize, fake_quant_layers, matches, quantize_modules

__all__ = [
    "FAKE_QUANT_TYPES",
    "GRANULARITIES",
    "FakeQuantConv1d",
    "FakeQuantConv2d",
    "FakeQuantLinear",
    "FakeQuantModule",
    "MovingAverageMinMaxObserver",
    "QuantSpec",
    "accept_plain_state_dicts",
    "affine_qparams",
    "broadcast_observers",
    "convert",
    "dequantize",
    "fake_quant_layers",
    "fake_quantize_per_channel",
    "fake_quantize_per_tensor",
    "fake_quantize_weight",
    "integer_weight",
    "load_quant_state",
    "matches",
    "parse_bits",
    "quant_state_dict",
    "quantize_modules",
    "symmetric_weight_scale",
    "torch_fake_quant_ops",
]
