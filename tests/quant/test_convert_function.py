"""``convert`` returns the function QAT trained: activation quantize/dequantize kept with the learned qparams,
plain layer types and state-dict keys; ``activations=False`` is the plain-float model (issue 17, item 3)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lp_lightning.models.nets import build_net
from lp_lightning.quant import QuantSpec, convert, dequantize, fake_quant_layers, quantize_modules
from lp_lightning.quant.input_quant import has_input_quant
from tests.user_pkg.models import DepthwiseSeparableCNN, TinyResNet


def _trained(model: nn.Module, spec: QuantSpec) -> nn.Module:
    torch.manual_seed(0)
    quantize_modules(model, spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(8):  # weights move after the ranges were set, so the clamps matter
        x = torch.rand(32, 1, 8, 8) * 2
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model.eval()


MODELS = {
    "cnn": lambda: nn.Sequential(build_net("cnn", (1, 8, 8), 10)),
    "tinyresnet": lambda: TinyResNet(width=8, blocks=1),
    "dscnn": lambda: DepthwiseSeparableCNN(width=8),
}


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4, "per_group", 8)], ids=["int8", "int4w"])
@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_computes_exactly_what_the_qat_model_computes(name: str, spec: QuantSpec) -> None:
    torch.manual_seed(0)
    model = _trained(MODELS[name](), spec)
    plain_keys = set(dequantize(model).state_dict())
    x = torch.rand(64, 1, 8, 8) * 3  # beyond the observed ranges too: the clamps are part of the function
    converted, qparams = convert(model)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), model(x))
    assert not fake_quant_layers(converted)
    assert set(converted.state_dict()) == plain_keys  # the qparams are non-persistent buffers
    assert all(has_input_quant(converted.get_submodule(n)) for n in qparams)
    again = copy.deepcopy(converted)  # hooks and buffers survive copies
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    plain, _ = convert(model, activations=False)
    assert not any(has_input_quant(m) for m in plain.modules())
    with torch.no_grad():
        assert not torch.equal(plain(x), model(x))  # without activation quantization it is another function
