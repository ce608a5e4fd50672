"""Fake-quant layers: grids (distinct values), straight-through gradients, observers, buffers, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lp_lightning.quant import (
    FakeQuantConv1d,
    FakeQuantConv2d,
    FakeQuantLinear,
    MovingAverageMinMaxObserver,
    QuantSpec,
    affine_qparams,
    integer_weight,
    quantize_modules,
)

LAYERS = {
    "linear": (lambda: nn.Linear(64, 12), lambda: torch.randn(16, 64)),
    "conv1d": (lambda: nn.Conv1d(8, 6, 3, padding=1), lambda: torch.randn(4, 8, 10)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), lambda: torch.randn(4, 4, 6, 6)),
}
FAKE = {"linear": FakeQuantLinear, "conv1d": FakeQuantConv1d, "conv2d": FakeQuantConv2d}
SPECS = {
    "w8a8": QuantSpec(8, "per_channel", None, 8),
    "w4a8": QuantSpec(4, "per_channel", None, 8),
    "w4g16a8": QuantSpec(4, "per_group", 16, 8),
    "w4g16": QuantSpec(4, "per_group", 16, None),
}


def _fake(kind: str, spec: QuantSpec) -> nn.Module:
    torch.manual_seed(0)
    return FAKE[kind].from_float(LAYERS[kind][0](), spec, f"net.{kind}")


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_quantized_weight_takes_few_distinct_values_per_channel_or_group(kind: str, spec_name: str) -> None:
    spec = SPECS[spec_name]
    layer = _fake(kind, spec)
    wq = layer.quantized_weight().detach()
    groups = wq.reshape(wq.shape[0], -1)
    if layer.spec.group_size:  # conv layers fall back to per channel
        groups = groups.reshape(-1, layer.spec.group_size)
    limit = 2 ** spec.weight_bits
    for row in groups:
        assert 2 < row.unique().numel() <= limit
    # every value is an integer multiple of its scale, inside the symmetric range
    scale = layer.weight_scale.reshape(-1, 1)
    q = groups / scale
    assert torch.allclose(q, q.round(), atol=1e-3)
    assert q.abs().max() <= 2 ** (spec.weight_bits - 1) - 1 + 1e-3
    ints = integer_weight(layer.weight, layer.weight_scale, spec.weight_bits, layer.spec.group_size)
    assert ints.dtype == torch.int8
    assert torch.allclose(ints.float().reshape(groups.shape) * scale, groups, atol=1e-6)
    assert (layer.weight_zero_point == 0).all() and layer.weight_zero_point.dtype == torch.int32


@pytest.mark.parametrize("kind", list(LAYERS))
def test_gradients_are_straight_through(kind: str) -> None:
    layer = _fake(kind, SPECS["w8a8"]).train()
    x = LAYERS[kind][1]().requires_grad_(True)
    layer(x).square().sum().backward()
    # oracle: the plain op evaluated at the quantized weight/input, gradients passed through unchanged
    with torch.no_grad():
        wq = layer.quantized_weight()
        xq = layer.act_observer.fake_quantize(x)
    wq.requires_grad_(True)
    xq.requires_grad_(True)
    plain = F.linear(xq, wq, layer.bias) if kind == "linear" else layer._conv_forward(xq, wq, layer.bias)
    plain.square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    torch.testing.assert_close(layer.weight.grad, wq.grad)
    # inputs inside the observed range get the gradient unchanged (the first batch sets the range exactly)
    torch.testing.assert_close(x.grad, xq.grad)


def test_inputs_outside_the_frozen_range_get_no_gradient() -> None:
    layer = _fake("linear", SPECS["w8a8"]).train()
    layer(torch.rand(8, 64))  # range [0, ~1]
    layer.freeze_observer()
    x = torch.full((2, 64), 5.0, requires_grad=True)
    layer(x).sum().backward()
    assert (x.grad == 0).all()


def test_observer_moving_average_and_freeze() -> None:
    obs = MovingAverageMinMaxObserver(8, averaging_constant=0.5)
    assert not obs.initialized
    obs.observe(torch.tensor([-1.0, 3.0]))
    assert (float(obs.min_val), float(obs.max_val)) == (-1.0, 3.0)
    obs.observe(torch.tensor([-3.0, 1.0]))
    assert (float(obs.min_val), float(obs.max_val)) == (-2.0, 2.0)
    scale, zp = affine_qparams(torch.tensor(-2.0), torch.tensor(2.0))
    assert float(obs.scale) == pytest.approx(float(scale)) == pytest.approx(4 / 255)
    assert int(obs.zero_point) == int(zp)
    obs.freeze()
    obs.observe(torch.tensor([-100.0, 100.0]))
    assert (float(obs.min_val), float(obs.max_val)) == (-2.0, 2.0)
    # frozen flag and range are buffers: they load back, python mirrors follow
    fresh = MovingAverageMinMaxObserver(8)
    fresh.load_state_dict(obs.state_dict())
    assert fresh.is_frozen and fresh.initialized and float(fresh.max_val) == 2.0


@pytest.mark.parametrize(("lo", "hi"), [(-1.0, 3.0), (0.0, 6.0), (-5.0, -1.0), (0.5, 0.7), (0.0, 0.0)])
def test_affine_qparams_represent_zero_exactly_and_cover_the_range(lo: float, hi: float) -> None:
    scale, zp = affine_qparams(torch.tensor(lo), torch.tensor(hi))
    assert zp.dtype == torch.int32 and -128 <= int(zp) <= 127
    x = torch.tensor([min(lo, 0.0), 0.0, max(hi, 0.0)])
    xq = torch.fake_quantize_per_tensor_affine(x, scale, zp, -128, 127)
    assert float(xq[1]) == 0.0
    torch.testing.assert_close(xq, x, atol=float(scale), rtol=0)


def test_eval_mode_does_not_update_observers_and_uses_stored_qparams() -> None:
    layer = _fake("linear", SPECS["w8a8"])
    layer.eval()
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.quantized_weight(), layer.bias))  # unobserved: pass-through
    layer.train()(x)
    before = layer.act_observer.state_dict()
    layer.eval()(10 * x)
    assert all(torch.equal(before[k], v) for k, v in layer.act_observer.state_dict().items())


def test_from_float_shares_parameters_and_keeps_state_dict_keys() -> None:
    plain = nn.Linear(64, 8)
    fake = FakeQuantLinear.from_float(plain, SPECS["w8a8"], "fc")
    assert fake.weight is plain.weight and type(plain) is nn.Linear
    keys = set(fake.state_dict())
    assert {"weight", "bias"} <= keys
    assert {"weight_scale", "weight_zero_point", "act_observer.scale", "act_observer.zero_point",
            "act_observer.min_val", "act_observer.max_val", "act_observer.frozen"} <= keys
    assert isinstance(fake, nn.Linear)


@pytest.mark.parametrize("bits", [3, 16, 2])
def test_unsupported_bits_name_the_layer_and_value(bits: int) -> None:
    with pytest.raises(ValueError, match=rf"'net\.fc'.*weight_bits={bits}"):
        FakeQuantLinear.from_float(nn.Linear(64, 8), QuantSpec(weight_bits=bits), "net.fc")
    with pytest.raises(ValueError, match=rf"'net\.fc'.*act_bits={bits}"):
        FakeQuantLinear.from_float(nn.Linear(64, 8), QuantSpec(act_bits=bits), "net.fc")


def test_group_size_that_does_not_divide_names_the_layer_and_value() -> None:
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 10))
    with pytest.raises(ValueError, match=r"'1'.*group_size=32.*in_features=48"):
        quantize_modules(model, QuantSpec(4, "per_group", 32))
    assert type(model[0]) is nn.Linear  # nothing half-swapped


def test_conv_per_group_request_falls_back_to_per_channel() -> None:
    conv = FakeQuantConv2d.from_float(nn.Conv2d(3, 8, 3), QuantSpec(4, "per_group", 32), "stem")
    assert conv.spec.granularity == "per_channel" and conv.spec.group_size is None
    assert conv.weight_scale.shape == (8,)


def test_from_float_rejects_the_wrong_type() -> None:
    with pytest.raises(TypeError, match="needs a Linear"):
        FakeQuantLinear.from_float(nn.Conv2d(1, 1, 1), SPECS["w8a8"], "x")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_a_model_cast_to_another_dtype_keeps_observing(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layer = FakeQuantLinear.from_float(nn.Linear(8, 4), QuantSpec(8, "per_channel", None, 8)).to(dtype)
    for _ in range(2):  # the first batch sets the range, the second one folds into the moving average
        out = layer(torch.randn(16, 8, dtype=dtype))
    obs = layer.act_observer
    assert out.dtype == dtype and obs.initialized and obs.min_val.dtype == dtype
    assert float(obs.min_val) < 0 < float(obs.max_val)
