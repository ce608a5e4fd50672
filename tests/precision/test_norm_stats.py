"""PureHalfPrecision keeps normalization running statistics in fp32 (norm_stats="float32", the default)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lp_lightning.precision import PureHalfPrecision
from lp_lightning.precision.norm_stats import stats_bytes

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
LAYERS = {
    "bn1d": (lambda: nn.BatchNorm1d(4), (16, 4)),
    "bn2d": (lambda: nn.BatchNorm2d(4), (8, 4, 3, 3)),
    "bn3d": (lambda: nn.BatchNorm3d(4), (4, 4, 2, 2, 2)),
    "sync": (lambda: nn.SyncBatchNorm(4), (8, 4, 3, 3)),  # not distributed here: torch's plain batch_norm path
    "in2d": (lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True), (8, 4, 3, 3)),
}


class Net(nn.Module):
    """A norm layer straight on the input (so its batch statistics are the data's), then a linear head."""

    def __init__(self, norm: nn.Module, features: int = 4) -> None:
        super().__init__()
        self.norm = norm
        self.head = nn.Linear(features, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return self.head(y.flatten(2).mean(-1) if y.dim() > 2 else y)


def batches(shape: tuple[int, ...], n: int = 40) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    # variance ~1.1 and mean ~0.05: a 0.1-momentum update of a 16-bit running_var near 1 rounds away
    return [torch.randn(shape, generator=gen) * 1.05 + 0.05 for _ in range(n)]


def run_stats(layer: str, dtype: str | None, norm_stats: str = "float32") -> Net:
    """Forward (train mode) the same batches through a fresh net: fp32 (``dtype=None``) or under the plugin."""
    make, shape = LAYERS[layer]
    torch.manual_seed(0)
    net = Net(make())
    if dtype is None:
        for x in batches(shape):
            net(x)
        return net
    plugin = PureHalfPrecision(dtype, compute="native", norm_stats=norm_stats)
    net = plugin.convert_module(net)
    with plugin.forward_context():
        for x in batches(shape):
            out = net(plugin.convert_input(x))
            assert out.dtype == DTYPES[dtype]
    return net


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_running_stats_fp32_and_match_fp32_run(layer, dtype):
    ref = run_stats(layer, None).norm
    norm = run_stats(layer, dtype).norm
    assert norm.running_mean.dtype == norm.running_var.dtype == torch.float32
    assert norm.weight.dtype == norm.bias.dtype == DTYPES[dtype]
    assert norm.num_batches_tracked.dtype == torch.int64
    assert int(norm.num_batches_tracked) == (0 if layer == "in2d" else 40)  # InstanceNorm does not count
    assert float(ref.running_var.mean()) > 1.05  # moved well away from its initial 1.0
    torch.testing.assert_close(norm.running_mean, ref.running_mean, atol=3e-3, rtol=0)
    torch.testing.assert_close(norm.running_var, ref.running_var, atol=2e-2, rtol=0)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_16bit_stats_freeze_as_before(dtype):
    ref = run_stats("bn2d", None).norm
    norm = run_stats("bn2d", dtype, norm_stats="16bit").norm
    assert norm.running_var.dtype == DTYPES[dtype]
    if dtype == "float16":
        return  # fp16's 10-bit mantissa resolves these updates; bf16's 7 bits do not
    assert not norm._forward_pre_hooks
    gap = (norm.running_var.float() - ref.running_var).abs().max()
    kept = (run_stats("bn2d", dtype).norm.running_var - ref.running_var).abs().max()
    assert gap > 0.015 and gap > 5 * kept  # stuck near 1 while fp32's moved to ~1.1


def test_gradients_16bit_and_eval_uses_fp32_stats():
    plugin = PureHalfPrecision("bfloat16", compute="native")
    net = plugin.convert_module(Net(nn.BatchNorm2d(4)))
    x = batches((8, 4, 3, 3), 1)[0].bfloat16()
    with plugin.forward_context():
        net(x).float().sum().backward()
        assert {p.grad.dtype for p in net.parameters()} == {torch.bfloat16}
        assert isinstance(net.norm.weight, nn.Parameter)  # restored after the forward
        net.eval()
        assert net(x).dtype == torch.bfloat16
    assert net.norm.running_mean.dtype == torch.float32


def test_hooks_restore_parameters_when_forward_raises():
    plugin = PureHalfPrecision("bfloat16")
    net = plugin.convert_module(Net(nn.BatchNorm2d(4)))
    weight = net.norm.weight
    with pytest.raises(RuntimeError), plugin.forward_context():
        net.norm(torch.ones(2, 3, 2, 2, dtype=torch.bfloat16))  # wrong channel count
    assert net.norm.weight is weight


def test_checkpoint_round_trip_copy_and_pickle():
    plugin = PureHalfPrecision("bfloat16")
    trained = run_stats("bn2d", "bfloat16").norm
    state = Net(nn.BatchNorm2d(4)).state_dict()
    state.update({f"norm.{k}": v for k, v in trained.state_dict().items()})
    assert state["norm.running_var"].dtype == torch.float32  # saved fp32
    converted = plugin.convert_module(Net(nn.BatchNorm2d(4)))
    converted.load_state_dict(state)  # into a converted module
    fresh = Net(nn.BatchNorm2d(4))
    fresh.load_state_dict(state)  # into a fresh one, converted afterwards (Lightning's resume order differs)
    fresh = plugin.convert_module(fresh)
    for net in (converted, fresh):
        assert net.norm.running_var.dtype == torch.float32
        assert torch.equal(net.norm.running_var, trained.running_var)
    export = Net(nn.BatchNorm2d(4))  # an fp32 module rebuilt from the checkpoint (export)
    export.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    assert torch.equal(export.norm.running_var, trained.running_var)
    # lp-audit: convert_module(deepcopy(module)); converting again adds no second hook
    audit = plugin.convert_module(copy.deepcopy(converted))
    assert len(audit.norm._forward_pre_hooks) == 1 and audit.norm.running_var.dtype == torch.float32
    buf = io.BytesIO()
    torch.save(audit, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with plugin.forward_context():
        assert loaded(torch.ones(2, 4, 3, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert stats_bytes(loaded) == 2 * 4 * 4  # running_mean + running_var, 4 channels, fp32


def test_bad_norm_stats():
    with pytest.raises(ValueError, match=r"norm_stats='fp64' is not supported; allowed: \['float32', '16bit'\]"):
        PureHalfPrecision("bfloat16", norm_stats="fp64")


def test_audit_precision_path_on_a_batchnorm_model():
    """lp-audit's precision path: convert_module(deepcopy(module)), forwards under forward_context."""
    from lp_lightning.audit_models import audit_modules

    net = run_stats("bn2d", None).eval()  # trained statistics, fp32
    data = [(x, torch.zeros(len(x), dtype=torch.long)) for x in batches((32, 4, 3, 3), 2)]
    report, _ = audit_modules(net, data, precision=PureHalfPrecision("bfloat16"))
    assert report["n_samples"] == 64 and report["nonfinite"] == 0 and report["agreement"] > 0.9
    assert net.norm.running_var.dtype == torch.float32 and not net.norm._forward_pre_hooks  # original untouched
