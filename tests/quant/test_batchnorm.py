"""BatchNorm statistics re-estimated with the current weights and ranges (issue 17, item 2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lp_lightning.quant import QuantSpec, quantize_modules
from lp_lightning.quant.batchnorm import recalibrate_batchnorm


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                         nn.Flatten(), nn.Linear(256, 3))


def test_statistics_are_the_exact_average_and_nothing_else_changes() -> None:
    net = _net()
    quantize_modules(net, QuantSpec())
    batches = [torch.randn(16, 1, 8, 8) * 3 + 1 for _ in range(5)]
    net.train()(batches[0])  # observers see data
    ranges = {k: v.clone() for k, v in net.state_dict().items() if "act_observer" in k}
    net[1].running_mean.fill_(100.0)  # stale
    assert recalibrate_batchnorm(net, batches, num_batches=4) == 4
    assert net.training and all(m.training for m in net.modules())  # modes restored
    assert net[1].momentum == 0.1
    assert all(torch.equal(net.state_dict()[k], v) for k, v in ranges.items())  # observers did not observe
    net.eval()
    with torch.no_grad():
        pre = torch.cat([net[0](b) for b in batches[:4]])  # conv output (quantized input, snapped weight)
    assert torch.allclose(net[1].running_mean, pre.mean((0, 2, 3)), atol=1e-5)
    per_batch_var = torch.stack([net[0](b).detach().var((0, 2, 3)) for b in batches[:4]]).mean(0)
    assert torch.allclose(net[1].running_var, per_batch_var, rtol=1e-4)


def test_no_batch_keeps_the_statistics_and_bad_count_is_an_error() -> None:
    net = _net()
    net[1].running_mean.fill_(2.0)
    assert recalibrate_batchnorm(net, [], num_batches=3) == 0
    assert torch.equal(net[1].running_mean, torch.full((4,), 2.0))
    with pytest.raises(ValueError, match="num_batches=0"):
        recalibrate_batchnorm(net, [], num_batches=0)


def test_wrong_batch_keys_are_refused_at_the_first_batch_with_the_fix() -> None:
    """A dict-batch model with BatchNorm under FakeQuantPrecision: the attached recalibration's default
    input_key does not fit; refused before the first optimizer step, naming how to pass the key."""
    import lightning as L
    from torch import nn

    from lp_lightning.precision import FakeQuantPrecision
    from tests.user_pkg.data import DigitsRows
    from tests.user_pkg.models import RowTransformer

    class BNRows(RowTransformer):
        def __init__(self) -> None:
            super().__init__(d_model=16)
            self.bn = nn.BatchNorm1d(8)

        def forward(self, rows):
            return super().forward(self.bn(rows))

    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        plugins=[FakeQuantPrecision("int8")])
    with pytest.raises(ValueError, match=r"input_key='input' is not a key.*bn_recalibration=None.*input_key=\.\.\."):
        trainer.fit(BNRows(), datamodule=DigitsRows(layout="dict"))
    assert trainer.global_step == 0
