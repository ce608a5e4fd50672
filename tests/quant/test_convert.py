"""``convert``/``dequantize``/``quantize_modules``: plain module types, snapped weights, qparams format."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lp_lightning.models.nets import build_net
from lp_lightning.quant import (
    FakeQuantModule,
    QuantSpec,
    convert,
    dequantize,
    fake_quant_layers,
    matches,
    quantize_modules,
)

SPECS = {
    "int8": QuantSpec(8, "per_channel", None, 8),
    "int4_group": QuantSpec(4, "per_group", 16, 8),
    "int4_weight_only": QuantSpec(4, "per_channel", None, None),
}


class Wrapper(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _trained(net: str, spec: QuantSpec, skip: tuple[str, ...] = ()) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Wrapper(build_net(net, (1, 8, 8), 10))
    quantize_modules(model, spec, skip)
    x = torch.randn(32, 1, 8, 8)
    model.train()
    for _ in range(3):
        model(x)
    return model.eval(), x


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("net", ["mlp", "cnn", "vit"])
def test_convert_gives_plain_layers_snapped_weights_and_qparams(net: str, spec_name: str) -> None:
    spec = SPECS[spec_name]
    skip = ("patch_embed",) if net == "vit" else ()  # vit's patch embedding has 4 inputs (< group size)
    model, x = _trained(net, spec, skip)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain, qparams = convert(model)
    # the original model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not fake_quant_layers(plain)
    assert set(qparams) == set(fake_quant_layers(model))
    assert all(name.startswith("net.") for name in qparams)
    for name, qp in qparams.items():
        layer = plain.get_submodule(name)
        assert type(layer) in (nn.Linear, nn.Conv2d)
        assert set(layer.state_dict()) <= {"weight", "bias"}
        assert set(qp) == {"weight_scale", "weight_zero_point", "bits", "granularity", "group_size",
                           "act_scale", "act_zero_point", "act_bits"}
        assert qp["bits"] == spec.weight_bits
        out = layer.weight.shape[0]
        per_group = qp["granularity"] == "per_group"
        assert per_group == (spec.granularity == "per_group" and isinstance(layer, nn.Linear))
        if per_group:
            assert qp["group_size"] == spec.group_size
            assert qp["weight_scale"].shape == (out, layer.in_features // spec.group_size)
        else:
            assert qp["group_size"] is None and qp["weight_scale"].shape == (out,)
        assert qp["weight_scale"].dtype == torch.float32
        assert qp["weight_zero_point"].dtype == torch.int32 and not qp["weight_zero_point"].any()
        # snapped: weight / scale are integers in the symmetric range
        w = layer.weight.detach().reshape(out, -1)
        if per_group:
            w = w.reshape(out, -1, spec.group_size)
        q = w / qp["weight_scale"].unsqueeze(-1)
        assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 2 ** (spec.weight_bits - 1) - 1 + 1e-3
        if spec.act_bits:
            assert isinstance(qp["act_scale"], float) and qp["act_scale"] > 0
            assert isinstance(qp["act_zero_point"], int) and -128 <= qp["act_zero_point"] <= 127
            assert qp["act_bits"] == 8
        else:
            assert qp["act_scale"] is qp["act_zero_point"] is qp["act_bits"] is None
    if not spec.act_bits:  # weights-only: the plain model computes exactly what the fake-quant model does
        with torch.no_grad():
            torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)


def test_plain_model_matches_fake_quant_model_up_to_activation_rounding() -> None:
    model, x = _trained("mlp", SPECS["int8"])
    plain, _ = convert(model)
    with torch.no_grad():
        fq, pl = model(x), plain(x)
    assert (fq - pl).abs().max() < 0.1 * fq.abs().max()
    assert (fq.argmax(1) == pl.argmax(1)).float().mean() >= 0.9


def test_dequantize_keeps_the_original_weights() -> None:
    model, _ = _trained("cnn", SPECS["int4_group"])
    ref = dequantize(model)
    for name, layer in fake_quant_layers(model).items():
        assert torch.equal(ref.get_submodule(name).weight, layer.weight)
        assert ref.get_submodule(name).weight is not layer.weight
    assert not any(isinstance(m, FakeQuantModule) for m in ref.modules())


def test_convert_refuses_a_model_without_fake_quant_layers() -> None:
    with pytest.raises(ValueError, match="no fake-quant layers"):
        convert(nn.Sequential(nn.Linear(4, 2)))


def test_quantize_modules_is_idempotent_and_honours_skip() -> None:
    torch.manual_seed(0)
    model = Wrapper(build_net("cnn", (1, 8, 8), 10))
    names = quantize_modules(model, SPECS["int8"], skip=("net.stem.0", "classifier"))
    assert "net.stem.0" not in names and "net.classifier" not in names and len(names) == 5
    layers = fake_quant_layers(model)
    assert quantize_modules(model, SPECS["int8"], skip=("net.stem.0", "classifier")) == names
    assert len(quantize_modules(model, SPECS["int8"])) == 7  # a second call without skip adds stem and head
    again = fake_quant_layers(model)
    assert all(again[n] is layers[n] for n in names)  # existing fake-quant layers are not re-wrapped


def test_glob_skip_and_unquantizable_model() -> None:
    model = Wrapper(build_net("vit", (1, 8, 8), 10))
    names = quantize_modules(model, SPECS["int8"], skip=("*.attn.*",))
    assert names and not any(".attn." in n for n in names)
    assert quantize_modules(nn.Sequential(nn.ReLU()), SPECS["int8"]) == []


@pytest.mark.parametrize(("pattern", "selected"), [
    ("net.stages.0", True), ("stages.0", True), ("stages.0.conv1", True), ("net", True), ("conv1", True),
    ("stages", True), ("stages.1", False), ("ages.0", False), ("0.conv", False), ("*.conv1", True),
])
def test_matches_names_a_layer_or_a_module_that_contains_it(pattern: str, selected: bool) -> None:
    assert matches("net.stages.0.conv1", [pattern]) is selected


def test_skipping_a_block_skips_every_layer_inside_it() -> None:
    model = Wrapper(build_net("cnn", (1, 8, 8), 10))
    names = quantize_modules(model, SPECS["int8"], skip=("net.stages.0",))
    assert names and not any(n.startswith("net.stages.0.") for n in names)
    assert "net.stages.1.conv1" in names


def test_requantizing_with_another_spec_is_an_error_naming_the_layer() -> None:
    model = Wrapper(build_net("mlp", (1, 8, 8), 10))
    quantize_modules(model, SPECS["int8"])
    before = {n: m.spec for n, m in fake_quant_layers(model).items()}
    with pytest.raises(ValueError, match=r"layer 'net.features.1' is already fake-quantized with .*weight_bits=8"):
        quantize_modules(model, SPECS["int4_weight_only"])
    assert {n: m.spec for n, m in fake_quant_layers(model).items()} == before
    fresh = dequantize(model)
    assert len(quantize_modules(fresh, SPECS["int4_weight_only"])) == len(before)
