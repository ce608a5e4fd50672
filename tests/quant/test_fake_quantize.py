"""The vectorized fake-quantize path reproduces torch's fake-quantize ops bit for bit (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from lp_lightning.quant import (
    fake_quantize_per_channel,
    fake_quantize_per_tensor,
    fake_quantize_weight,
    symmetric_weight_scale,
    torch_fake_quant_ops,
)


@pytest.mark.parametrize(("qmin", "qmax"), [(-128, 127), (-8, 7)])
@pytest.mark.parametrize("seed", range(3))
def test_per_tensor_matches_torch(seed: int, qmin: int, qmax: int) -> None:
    torch.manual_seed(seed)
    scale = torch.tensor(0.0125 * 2.0 ** seed)  # a power of two times 0.1: exact ties below
    zp = torch.tensor(seed * 3 - 4, dtype=torch.int32)
    x = torch.randn(64, 33) * 3
    x[0, :5] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5]) * scale  # ties round half to even in both
    x.requires_grad_(True)
    fast = fake_quantize_per_tensor(x, scale, zp, qmin, qmax)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    assert torch.equal(fast, ref)
    g = torch.randn_like(x)
    (gf,) = torch.autograd.grad(fast, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(gf, gr) and (gr == 0).any()  # some values were clamped: the mask matters


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("qmin", "qmax"), [(-128, 127), (-8, 7)])
@pytest.mark.parametrize("shape", [(16, 40), (8, 3, 3, 3), (6, 4, 5)])
def test_per_channel_matches_torch(shape: tuple[int, ...], qmin: int, qmax: int, symmetric: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(shape, requires_grad=True)
    scale = w.detach().reshape(shape[0], -1).abs().amax(1) / (qmax - 1)  # some weights clamp
    zp = torch.zeros(shape[0], dtype=torch.int32)
    fast = fake_quantize_per_channel(w, scale, zp, qmin, qmax, symmetric=symmetric)
    ref = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, qmin, qmax)
    assert torch.equal(fast, ref)
    g = torch.randn_like(w)
    assert torch.equal(torch.autograd.grad(fast, w, g)[0], torch.autograd.grad(ref, w, g)[0])


def test_torch_ops_can_be_forced() -> None:
    x = torch.randn(4, 4)
    with torch_fake_quant_ops():
        out = fake_quantize_per_tensor(x, torch.tensor(0.1), torch.tensor(0, dtype=torch.int32), -128, 127)
    assert torch.equal(out, torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -128, 127))


@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (4, None), (4, 8)])
def test_weight_path_without_mask_matches_torch(bits: int, group_size: int | None) -> None:
    torch.manual_seed(1)
    w = torch.randn(12, 32, requires_grad=True)
    scale = symmetric_weight_scale(w, bits, group_size)
    zp = torch.zeros(scale.shape, dtype=torch.int32)
    fast = fake_quantize_weight(w, scale, zp, bits, group_size)
    with torch_fake_quant_ops():
        ref = fake_quantize_weight(w, scale, zp, bits, group_size)
    assert torch.equal(fast, ref)
    g = torch.randn_like(w)
    assert torch.equal(torch.autograd.grad(fast, w, g)[0], torch.autograd.grad(ref, w, g)[0])
