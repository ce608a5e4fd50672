"""EpsilonGuard: raise before any weight change, fix, warn once, run-time statistics, Hydra override."""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lp_lightning.audit.epsilon import UnsafeEpsilonError
from lp_lightning.callbacks import EpsilonGuard
from lp_lightning.config import build_callbacks
from lp_lightning.data import DigitsDataModule
from lp_lightning.models import Classifier
from lp_lightning.precision import PureHalfPrecision
from tests.conftest import compose_train

ADAM_1E8 = {"name": "adam", "lr": 1e-3, "eps": 1e-8}


def _fit(root: Path, dtype: str | None, optimizer: dict, guard: EpsilonGuard, steps: int = 3,
         model: Classifier | None = None, **kw) -> tuple[Classifier, L.Trainer]:
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32)
    model = model or Classifier(net="mlp", input_shape=list(dm.input_shape), num_classes=dm.num_classes,
                                optimizer=optimizer)
    # update="nearest": Adam's arithmetic in 16 bits, where eps=1e-8 is lost (the default steps in fp32)
    plugins = [PureHalfPrecision(dtype, compute="fp32_accumulate", update="nearest")] if dtype else []
    kw = {"logger": False, **kw}
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, default_root_dir=str(root),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, plugins=plugins, callbacks=[guard], **kw)
    trainer.fit(model, datamodule=dm)
    return model, trainer


def test_bad_action_lists_the_three() -> None:
    with pytest.raises(ValueError, match=r"action='fixx'.*\['warn', 'raise', 'fix'\]"):
        EpsilonGuard(action="fixx")
    with pytest.raises(ValueError, match="check_every_n_steps"):
        EpsilonGuard(check_every_n_steps=-1)


def test_raise_before_any_weight_change(tmp_path: Path) -> None:
    dm = DigitsDataModule(batch_size=32)
    model = Classifier(net="mlp", input_shape=list(dm.input_shape), num_classes=dm.num_classes, optimizer=ADAM_1E8)
    before = {k: v.detach().clone().half() for k, v in model.state_dict().items() if v.is_floating_point()}
    with pytest.raises(UnsafeEpsilonError) as err:
        _fit(tmp_path, "float16", ADAM_1E8, EpsilonGuard(action="raise"), model=model)
    msg = str(err.value)
    for part in ("Adam", "group 0", "eps=1e-08", "float16", "0.000244"):
        assert part in msg, (part, msg)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # fp16-rounded init, never stepped
    assert len(model.trainer.optimizers[0].state) == 0


def test_fix_sets_safe_eps_and_says_so_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    guard = EpsilonGuard(action="fix", check_every_n_steps=1)
    with caplog.at_level(logging.INFO):
        model, trainer = _fit(tmp_path, "float16", ADAM_1E8, guard)
    assert trainer.optimizers[0].param_groups[0]["eps"] == 2.0**-12
    assert [(c.status, new) for c, new in guard.changes] == [("zero", 2.0**-12)]
    fixed = [r for r in caplog.records if "EpsilonGuard fixed" in r.getMessage()]
    assert len(fixed) == 1 and "1e-08 -> 0.000244" in fixed[0].getMessage()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(guard.history) == 3 and all(h["epsilon_guard/max_update_over_lr"] < 100 for h in guard.history)


def test_warn_once_and_leave_eps(tmp_path: Path) -> None:
    guard = EpsilonGuard(action="warn", check_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, trainer = _fit(tmp_path, "float16", ADAM_1E8, guard)
    texts = [str(w.message) for w in caught]
    assert sum("rounds to 0 in float16" in t for t in texts) == 1
    assert trainer.optimizers[0].param_groups[0]["eps"] == 1e-8
    # the lost eps shows in the run-time statistics: exploding updates, warned once
    assert guard.history[0]["epsilon_guard/max_update_over_lr"] == float("inf")
    assert sum("max_update_over_lr=inf" in t for t in texts) == 1


@pytest.mark.parametrize(("dtype", "eps"), [("bfloat16", 1e-8), (None, 1e-8), (None, 1e-12)])
def test_bf16_and_fp32_reported_safe(tmp_path: Path, dtype: str | None, eps: float) -> None:
    guard = EpsilonGuard(action="raise", check_every_n_steps=0)
    _, trainer = _fit(tmp_path, dtype, {**ADAM_1E8, "eps": eps}, guard, steps=1)
    expected = torch.bfloat16 if dtype else torch.float32
    assert [(c.status, c.dtype) for c in guard.checks] == [("ok", expected)]
    assert trainer.optimizers[0].param_groups[0]["eps"] == eps


def test_sgd_has_nothing_to_check(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    guard = EpsilonGuard(action="raise")
    with caplog.at_level(logging.INFO):
        _fit(tmp_path, "float16", {"name": "sgd", "lr": 0.05}, guard, steps=2)
    assert [c.status for c in guard.checks] == ["no_eps"]
    assert sum("no eps, nothing to check" in r.getMessage() for r in caplog.records) == 1


class _AdafactorClassifier(Classifier):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adafactor(self.parameters(), lr=1e-2)


def test_unknown_optimizer_is_reported_unchecked(tmp_path: Path) -> None:
    model = _AdafactorClassifier(net="mlp", input_shape=[1, 8, 8], num_classes=10)
    guard = EpsilonGuard(action="raise")
    with pytest.warns(UserWarning, match="Adafactor.*unchecked"):
        _fit(tmp_path, None, {}, guard, steps=1, model=model)
    assert [c.status for c in guard.checks] == ["unchecked"]


def test_statistics_go_to_the_trainer_logger(tmp_path: Path) -> None:
    guard = EpsilonGuard(action="fix", check_every_n_steps=2)
    _, trainer = _fit(tmp_path, "float16", ADAM_1E8, guard, steps=5, logger=CSVLogger(str(tmp_path)))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("epsilon_guard/v_zero_share")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]  # checked at steps 0, 2, 4 (logged after the step)
    for r in rows:
        assert 0.0 <= float(r["epsilon_guard/eps_dominated_share"]) <= 1.0
        assert float(r["epsilon_guard/max_update_over_lr"]) < 100


def test_hydra_safety_group_and_action_override() -> None:
    cfg = compose_train(["callbacks=safety", "callbacks.epsilon_guard.action=fix"])
    callbacks = build_callbacks(cfg.callbacks)
    guards = [c for c in callbacks if isinstance(c, EpsilonGuard)]
    assert len(guards) == 1 and guards[0].action == "fix"
    assert {type(c).__name__ for c in callbacks} == {"EpsilonGuard", "NumericsMonitor"}


class _LateGroupClassifier(Classifier):
    """Trains the head only, then adds the features as a second param group at step 2 (as fine-tuning
    callbacks do when they unfreeze a backbone); ``late_eps`` is that group's own eps (None: the default)."""

    def __init__(self, late_eps: float | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.late_eps = late_eps

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.classifier.parameters(), lr=1e-3, eps=1e-8, foreach=False)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.global_step == 2:
            group = {"params": list(self.net.features.parameters())}
            if self.late_eps is not None:
                group["eps"] = self.late_eps
            self.trainer.optimizers[0].add_param_group(group)


@pytest.mark.parametrize("late_eps", [None, 1e-8])
def test_fix_covers_a_param_group_added_later(tmp_path: Path, late_eps: float | None) -> None:
    model = _LateGroupClassifier(late_eps, net="mlp", input_shape=[1, 8, 8], num_classes=10)
    guard = EpsilonGuard(action="fix")
    _, trainer = _fit(tmp_path, "float16", {}, guard, steps=4, model=model)
    optimizer = trainer.optimizers[0]
    assert [g["eps"] for g in optimizer.param_groups] == [2.0**-12, 2.0**-12]
    assert optimizer.defaults["eps"] == 2.0**-12
    # a group that came with the (now safe) default needs no fix; one with its own 1e-8 is fixed at its first step
    assert [(c.group, c.status) for c, _ in guard.changes] == [(0, "zero")] + ([(1, "zero")] if late_eps else [])


def test_raise_covers_a_param_group_added_later(tmp_path: Path) -> None:
    model = _LateGroupClassifier(1e-8, net="mlp", input_shape=[1, 8, 8], num_classes=10)
    model.configure_optimizers = lambda: torch.optim.Adam(model.net.classifier.parameters(), lr=1e-3, eps=1e-3)
    with pytest.raises(UnsafeEpsilonError, match="group 1"):
        _fit(tmp_path, "float16", {}, EpsilonGuard(action="raise"), steps=4, model=model)
    assert model.global_step == 2  # stopped before the step that would use the new group


class _TwoOptimizers(L.LightningModule):
    """Manual optimization stepping two Adam optimizers per batch (global_step moves by 2 per batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = torch.nn.Linear(64, 10), torch.nn.Linear(64, 10)

    def training_step(self, batch, batch_idx: int) -> None:
        x = batch[0].flatten(1)
        for net, opt in zip((self.a, self.b), self.optimizers(), strict=True):
            opt.zero_grad()
            self.manual_backward(net(x).square().mean())
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.a.parameters(), lr=1e-3), torch.optim.Adam(self.b.parameters(), lr=1e-3)]


def test_statistics_cover_every_optimizer_of_a_manual_step(tmp_path: Path) -> None:
    guard = EpsilonGuard(action="raise", check_every_n_steps=2)
    _fit(tmp_path, None, {}, guard, steps=8, model=_TwoOptimizers())  # max_steps counts optimizer steps: 4 batches
    assert [h["step"] for h in guard.history] == [2.0, 6.0]  # batches 0 and 2 (global_step at their end)
    for h in guard.history:
        assert {"epsilon_guard/max_update_over_lr_0", "epsilon_guard/max_update_over_lr_1"} <= set(h)
