"""NumericsMonitor's lost-update and stalled-norm-statistics telemetry: the proxy, an oracle on real steps,
frozen BatchNorm statistics under Lightning's bf16-true, loss-scale skips, the summary file."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lp_lightning.audit.update_report import UpdateTelemetry
from lp_lightning.audit.updates import RunningStatsProbe, UpdateProbe, running_stat_modules, update_mask
from lp_lightning.callbacks import NumericsMonitor
from lp_lightning.callbacks.numerics_monitor import SUMMARY_FILE
from lp_lightning.precision import PureHalfPrecision
from tests.user_pkg.data import DigitsRows
from tests.user_pkg.models import TinyResNet


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread: these runs are small, and a shared 2-core machine thrashes with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _PlainSGD(TinyResNet):
    """TinyResNet with plain SGD (no momentum): the update is non-zero exactly where the gradient is."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.learning_rate)


class _Oracle(L.Callback):
    """Counts new == old among elements with a non-zero gradient, per parameter, on every step."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.old = {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        for name, p in pl_module.named_parameters():
            old, grad = self.old[name]
            moving = grad != 0
            acc = self.counts.setdefault(name, [0, 0])
            acc[0] += int(((p.detach() == old) & moving).sum())
            acc[1] += int(moving.sum())


def _fit(model: L.LightningModule, monitor: NumericsMonitor, root: Path, steps: int, precision: str = "32-true",
         plugins: list | None = None, callbacks: list | None = None) -> list[str]:
    """Fit on the user package's digits; return the NumericsMonitor warning texts."""
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=steps, precision=None if plugins else precision, plugins=plugins or [],
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, default_root_dir=str(root),
                        callbacks=[monitor, *(callbacks or [])])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=DigitsRows(layout="triple", batch_size=64))
    return [str(w.message) for w in caught if str(w.message).startswith("NumericsMonitor")]


# ---- the pure pieces --------------------------------------------------------------------------------
def test_update_mask_proxy() -> None:
    old = torch.tensor([1.0, 2.0, 0.0, 4.0])
    grad = torch.tensor([0.0, 1e-3, 0.0, float("inf")])
    assert update_mask(grad, {}, old).tolist() == [False, True, False, False]  # non-zero and finite only
    state = {"exp_avg": torch.tensor([1e-9, 0.0, 0.0, 0.0])}  # Adam moves wherever exp_avg != 0
    assert update_mask(grad, state, old).tolist() == [True, True, False, False]
    assert update_mask(None, {"momentum_buffer": torch.tensor([0.0, 0.0, 2.0, 0.0])}, old).tolist() == \
        [False, False, True, False]
    assert update_mask(grad, {"momentum_buffer": None}, old, weight_decay=0.1).tolist() == [True, True, False, True]


def test_update_probe_counts_a_bf16_step_and_skips_nonfinite() -> None:
    layer = nn.Linear(64, 4).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(0.0)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    probe = UpdateProbe({"fc": dict(layer.named_parameters())})
    layer.weight.grad = torch.full_like(layer.weight, 1.0)  # update 1e-3 < half an ulp of 1.0 in bf16 (2**-9)
    layer.weight.grad[0] = 10.0  # update 1e-2: survives
    layer.bias.grad = torch.ones_like(layer.bias)  # bias 0: any update survives
    probe.before(opt)
    opt.step()
    assert probe.after() == {"fc": {"weight": (3 * 64, 4 * 64), "bias": (0, 4)}}
    layer.weight.grad[1, 0] = float("inf")  # a loss scaler would skip this step: nothing is counted
    probe.before(opt)
    assert probe.armed and probe.after() is None and not probe.armed
    layer.weight.grad.zero_()
    layer.bias.grad.fill_(1e-30)  # nothing changes, and the plugin says its scale dropped: a skipped step
    probe.before(opt)
    opt.step()
    assert probe.after(scale_dropped=True) is None


def test_running_stats_probe_bf16_buffers_freeze_fp32_do_not() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 8, 4, 4) * 0.01 + 1.0  # converged statistics: the batch is close to the running stats
    found = {}
    for dtype in (torch.bfloat16, torch.float32):
        bn = nn.BatchNorm2d(8).to(dtype)
        with torch.no_grad():
            bn.running_mean.fill_(1.0)
            bn.running_var.fill_(1e-4)
        probe = RunningStatsProbe(running_stat_modules(nn.Sequential(bn)))
        probe.before()
        bn(x.to(dtype))
        found[dtype] = probe.after()["0"]
        bn.eval()
        probe.before()
        bn(x.to(dtype))
        assert probe.after() == {}  # eval mode: the module did not update its statistics, nothing to judge
    assert found[torch.bfloat16][0] >= 8 and found[torch.float32] == (0, 16)


def test_telemetry_flags_after_a_streak_and_once() -> None:
    tel = UpdateTelemetry(norm_stall_threshold=0.5, norm_stall_steps=2)
    info = {"bn": ("BatchNorm2d", "bfloat16", 0.1)}
    assert tel.add_norm({"bn": (9, 10)}, info)[1] is None
    assert tel.add_norm({"bn": (1, 10)}, info)[1] is None  # the streak breaks
    assert tel.add_norm({"bn": (9, 10)}, info)[1] is None
    message = tel.add_norm({"bn": (10, 10)}, info)[1]
    assert message is not None and "'bn' (BatchNorm2d, buffers bfloat16" in message
    assert tel.add_norm({"bn": (10, 10)}, info)[1] is None and tel.frozen_norm_stats == ["bn"]


@pytest.mark.parametrize("kwargs", [{"lost_update_threshold": 0.0}, {"norm_stall_threshold": 1.5},
                                    {"norm_stall_steps": 0}])
def test_bad_thresholds_name_the_argument(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        NumericsMonitor(**kwargs)


# ---- real runs --------------------------------------------------------------------------------------
def _pure_bf16(**kwargs: str) -> PureHalfPrecision:
    return PureHalfPrecision("bfloat16", compute="native", **kwargs)


@pytest.mark.parametrize(("precision", "steps"), [("bf16-true", 70), ("32-true", 20), ("pure-bf16", 20)])
def test_frozen_batchnorm_statistics_flagged_in_bf16_true_only(precision: str, steps: int, tmp_path: Path) -> None:
    """TinyResNet (SGD, lr 0.05) on digits: Lightning's pure bf16 casts the BN buffers to bf16; once the
    statistics are near the batch statistics their 0.1-momentum updates round away (flagged from step ~30).
    fp32, and PureHalfPrecision's default fp32 norm statistics, are not flagged."""
    monitor = NumericsMonitor(every_n_steps=2, modules=["fc"], heatmap=False)
    plugins = [_pure_bf16()] if precision == "pure-bf16" else None
    messages = _fit(TinyResNet(), monitor, tmp_path, steps=steps, precision=precision, plugins=plugins)
    norm = [m for m in messages if "running statistics stopped moving" in m]
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    rows = summary["norm_stats"]
    assert set(rows) == {"stem.1", "blocks.0.bn", "blocks.1.bn"}
    assert all(r["steps"] == steps // 2 for r in rows.values())
    if precision == "bf16-true":
        assert summary["frozen_norm_stats"] and len(norm) >= 1
        assert "buffers bfloat16, momentum 0.1" in norm[0] and 'PureHalfPrecision(norm_stats="float32")' in norm[0]
        assert all(rows[n]["flagged"] and rows[n]["dtype"] == "bfloat16" for n in summary["frozen_norm_stats"])
    else:
        assert summary["frozen_norm_stats"] == [] and norm == []
        assert all(r["unchanged_share"] == 0.0 and r["dtype"] == "float32" for r in rows.values())
    # (d) the summary file holds every new key
    assert {"update_steps", "update_skipped_steps", "lost_update_layers", "norm_stats",
            "frozen_norm_stats"} <= set(summary)
    assert summary["update_steps"] == list(range(0, steps, 2)) and summary["update_skipped_steps"] == []
    fc = summary["layers"]["fc"]
    assert {"update_lost_share", "update_lost", "update_moving", "update_lost_share_by_param",
            "update_flagged"} <= set(fc)
    assert set(fc["update_lost_share_by_param"]) == {"weight", "bias"}


@pytest.mark.parametrize("precision", ["bf16-true", "nearest", "32-true", "stochastic"])
def test_lost_updates_match_an_oracle(precision: str, tmp_path: Path) -> None:
    """Plain SGD at lr 1e-5: in bf16 (Lightning's bf16-true, or PureHalfPrecision(update="nearest")) nearly every
    update is below half an ulp of the weight; in fp32 almost none. With stochastic rounding ``new == old`` is
    measured the same way but is not a loss (unbiased in expectation): reported, not flagged."""
    monitor = NumericsMonitor(every_n_steps=1, modules=["stem.1", "blocks.0.pw", "fc"], heatmap=False)
    oracle = _Oracle()
    plugins = [_pure_bf16(update=precision)] if precision in ("nearest", "stochastic") else None
    messages = _fit(_PlainSGD(learning_rate=1e-5), monitor, tmp_path, steps=4, precision=precision,
                    plugins=plugins, callbacks=[oracle])
    tel = monitor.telemetry
    assert tel.update_rounding == ("stochastic" if precision == "stochastic" else "nearest")
    assert tel.update_steps == [0, 1, 2, 3]
    for layer, params in tel.updates.items():
        for name, counts in params.items():
            assert counts == oracle.counts[f"{layer}.{name}"], (layer, name)
    lost, moving = (sum(c[i] for p in tel.updates.values() for c in p.values()) for i in (0, 1))
    summary = monitor.summary()
    if precision == "stochastic":
        assert lost / moving > 0.9 and tel.lost_update_layers == [] and messages == []
        assert not summary["fc"]["update_flagged"]
    elif precision in ("bf16-true", "nearest"):  # lr 1e-5: updates far below half an ulp of bf16 weights
        assert lost / moving > 0.9 and set(tel.lost_update_layers) == {"stem.1", "blocks.0.pw", "fc"}
        lost_msgs = [m for m in messages if "lost to rounding" in m]
        assert len(lost_msgs) == 1 and "layer 'fc' (bfloat16)" in lost_msgs[0]
        assert 'update="stochastic"' in lost_msgs[0] and "larger learning rate will not" in lost_msgs[0]
        assert summary["stem.1"]["update_flagged"] and summary["stem.1"]["update_lost_share_by_param"]["weight"] > 0.9
    else:
        assert lost / moving < 0.05 and tel.lost_update_layers == [] and messages == []


def test_skipped_loss_scale_steps_are_not_counted(tmp_path: Path) -> None:
    """fp16 with a large initial dynamic loss scale: the first steps overflow and are skipped (weights unchanged);
    they must not be counted as lost updates (their unchanged weights would count as lost)."""
    plugin = PureHalfPrecision("float16", loss_scale="dynamic", init_scale=2.0**20, compute="fp32_accumulate",
                               update="nearest")
    monitor = NumericsMonitor(every_n_steps=1, modules=["fc"], heatmap=False)
    _fit(_PlainSGD(learning_rate=0.05), monitor, tmp_path, steps=8, plugins=[plugin])
    tel = monitor.telemetry
    skipped = plugin.scaler.skipped_steps
    assert 0 < skipped < 8 and tel.update_skipped_steps == list(range(skipped))  # backs off, then steps go through
    assert tel.update_steps == list(range(skipped, 8))
    row = monitor.summary()["fc"]
    assert row["update_lost_share"] < 0.05 and not row["update_flagged"]
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["update_skipped_steps"] == list(range(skipped))
