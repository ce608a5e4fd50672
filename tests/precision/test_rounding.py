"""Compensated 16-bit updates: stochastic rounding, Kahan compensation, the fp32 step under PureHalfPrecision."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lp_lightning.precision import PureHalfPrecision
from lp_lightning.precision.fp32_step import Fp32Step
from lp_lightning.precision.rounding import kahan_round, random_bits16, stochastic_round, stochastic_round_
from lp_lightning.precision.stand_ins import KAHAN_KEY

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1),
}


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_stochastic_round_is_unbiased(dtype):
    lo = torch.tensor(1.0, dtype=dtype)
    hi = torch.nextafter(lo, torch.tensor(2.0, dtype=dtype))
    value = lo.float() + 0.3 * (hi.float() - lo.float())
    gen = torch.Generator().manual_seed(0)
    out = stochastic_round(value.expand(100_000), dtype, gen)
    assert set(out.float().unique().tolist()) == {lo.item(), hi.item()}
    assert abs(out.float().mean() - value) < 0.01 * (hi.float() - lo.float())
    exact = torch.tensor([0.0, -1.5, 3.0, 2.0**-20, float("inf"), -float("inf")])
    torch.testing.assert_close(stochastic_round(exact, dtype, gen).float(), exact, rtol=0, atol=0)
    assert stochastic_round(torch.tensor([float("nan")]), dtype, gen).isnan().all()


@pytest.mark.parametrize("source", ["numpy", "torch"])
def test_random_bits16_are_uniform_in_every_bit(source):
    """Four 16-bit values per 64-bit draw: every bit of every lane is a fair coin (a draw without the sign bit
    would leave one lane in four with a constant top bit)."""
    gen = np.random.SFC64(0) if source == "numpy" else torch.Generator().manual_seed(0)
    bits = random_bits16(80_001, torch.device("cpu"), gen)
    assert bits.dtype == torch.int16 and bits.numel() == 80_001
    lanes = bits[:80_000].view(-1, 4).to(torch.int32)
    freq = torch.stack([(lanes >> k) & 1 for k in range(16)]).float().mean(dim=1)  # (16 bits, 4 lanes)
    assert ((freq - 0.5).abs() < 0.02).all(), freq  # 5.7 standard deviations; a stuck bit gives 0.5


@pytest.mark.parametrize("source", ["numpy", "torch"])
def test_in_place_rounding_is_unbiased_and_keeps_non_finite(source):
    gen = np.random.SFC64(1) if source == "numpy" else torch.Generator().manual_seed(1)
    lo = torch.tensor(-3.0, dtype=torch.bfloat16)
    hi = torch.nextafter(lo, torch.tensor(-4.0, dtype=torch.bfloat16))
    value = lo.float() + 0.7 * (hi.float() - lo.float())
    x = value.repeat(100_000)
    out = stochastic_round_(x, torch.bfloat16, gen)
    assert out is x and torch.equal(x, x.bfloat16().float())  # representable: the copy into bf16 is exact
    assert set(x.unique().tolist()) == {lo.item(), hi.item()}
    assert abs(float(x.mean()) - float(value)) < 0.01 * abs(float(hi) - float(lo))
    odd = torch.tensor([1.0, float("inf"), float("nan"), -float("inf"), 2.0**-130])  # a denormal too
    stochastic_round_(odd, torch.bfloat16, gen)
    assert odd[1] == float("inf") and odd[2].isnan() and odd[3] == -float("inf") and odd[0] == 1.0
    torch.testing.assert_close(odd, odd.bfloat16().float(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("value", [-3.3, 5e-5, 2.0**-20 * 1.37, -(2.0**-25), 1e-9, 65510.0])
def test_fp16_stochastic_rounding_across_binades_and_subnormals(value):
    """Between the two fp16 neighbours, unbiased: normal, subnormal (below 2**-14), below the smallest subnormal,
    and between the largest finite value and round-to-nearest's overflow threshold (stays finite)."""
    x = torch.full((200_000,), value)
    near = torch.tensor(value).half()
    toward = math.copysign(math.inf, value) if abs(value) > abs(float(near)) else 0.0
    step = torch.nextafter(near, torch.tensor(toward).half())
    out = stochastic_round(x, torch.float16, np.random.SFC64(3)).float()
    assert set(out.unique().tolist()) <= {float(near), float(step)}
    gap = abs(float(step) - float(near)) or 1.0
    assert abs(float(out.double().mean()) - value) < 0.01 * gap
    assert torch.isinf(stochastic_round(torch.tensor([7e4, -7e4]), torch.float16)).all()  # overflow stays visible


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_tiny_updates_survive(dtype):
    """1000 updates of 1e-4 to a weight of 1.0: round-to-nearest never moves it, both compensations do."""
    gen = torch.Generator().manual_seed(0)
    near, stoch, kahan = (torch.ones(64, dtype=dtype) for _ in range(3))
    comp = torch.zeros(64, dtype=dtype)
    for _ in range(1000):
        near = (near.float() + 1e-4).to(dtype)
        stoch = stochastic_round(stoch.float() + 1e-4, dtype, gen)
        kahan, comp = kahan_round(kahan.float() + comp.float() + 1e-4, dtype)
    assert torch.equal(near, torch.ones_like(near))
    assert abs(stoch.float().mean() - 1.1) < 0.01
    # the 16-bit compensation itself rounds (bf16: 8 bits of a value below half an ulp): ~1.097 for bf16
    torch.testing.assert_close(kahan.float() + comp.float(), torch.full((64,), 1.1), atol=5e-3, rtol=0)


@pytest.mark.parametrize("update", ["stochastic", "kahan"])
def test_fp32_step_keeps_storages_and_16bit_state(update):
    p = nn.Parameter(torch.ones(1024, dtype=torch.bfloat16))
    opt = torch.optim.Adam([p], lr=1e-4)
    storage, step = p.data.data_ptr(), Fp32Step(update, torch.bfloat16)
    for _ in range(100):
        p.grad = torch.ones_like(p)
        step.step(opt)
    assert p.data.data_ptr() == storage and p.dtype == p.grad.dtype == torch.bfloat16
    state = opt.state[p]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert state["step"].dtype == torch.float32  # Adam's counter untouched
    assert (KAHAN_KEY in state) == (update == "kahan")
    total = p.float() + (state[KAHAN_KEY].float() if update == "kahan" else 0)
    assert abs(float(total.mean()) - (1 - 100 * 1e-4)) < 1e-3  # nearest would stay at 1.0


class Tiny(L.LightningModule):
    """Linear regression on fixed data: the fp32 run is the reference the 16-bit runs are measured against."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x).float(), y)

    def configure_optimizers(self):
        return OPTIMIZERS[self.optimizer](self.parameters())


def loader() -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=gen)
    return DataLoader(TensorDataset(x, x[:, :1] * 2 + 0.5), batch_size=32)  # no shuffle: resumable bit for bit


def fit(root, optimizer: str, plugin: PureHalfPrecision | None, epochs: int = 20, ckpt: str | None = None,
        model: Tiny | None = None) -> tuple[Tiny, L.Trainer]:
    model = model or Tiny(optimizer)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=str(root), logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        plugins=[plugin] if plugin else [])
    trainer.fit(model, train_dataloaders=loader(), ckpt_path=ckpt)
    return model, trainer


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_compensated_updates_track_fp32(tmp_path, optimizer):
    ref = flat(fit(tmp_path, optimizer, None)[0])
    err, nbytes = {}, {}
    for update in ("nearest", "stochastic", "kahan"):
        model, trainer = fit(tmp_path, optimizer, PureHalfPrecision("bfloat16", compute="native", update=update))
        err[update] = float((flat(model) - ref).norm() / ref.norm())
        state = [t for s in trainer.optimizers[0].state.values() for t in s.values() if t.dim() > 0]
        assert {p.dtype for p in model.parameters()} | {t.dtype for t in state} == {torch.bfloat16}
        nbytes[update] = sum(p.nbytes + p.grad.nbytes for p in model.parameters()) + sum(t.nbytes for t in state)
    assert err["stochastic"] < err["nearest"] and err["kahan"] < err["nearest"], err
    params = sum(p.numel() for p in model.parameters())
    fp32 = 4 * params * (2 + {"sgd": 1, "adam": 2, "adamw": 2}[optimizer])  # params + grads + state
    assert nbytes["stochastic"] == nbytes["nearest"] == fp32 // 2
    assert nbytes["kahan"] == fp32 // 2 + 2 * params <= 0.75 * fp32


@pytest.mark.parametrize("update", ["stochastic", "kahan"])
def test_resume_equals_uninterrupted_run(tmp_path, update):
    def plugin() -> PureHalfPrecision:
        return PureHalfPrecision("bfloat16", compute="native", update=update)

    model = fit(tmp_path / "a", "adamw", plugin(), epochs=4)[0]
    full, stats = flat(model), model.net[1].running_var.clone()
    _, trainer = fit(tmp_path / "b", "adamw", plugin(), epochs=2)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    state = torch.load(tmp_path / "half.ckpt", weights_only=False)
    assert "rounding_generators" in state["PureHalfPrecision"]
    assert state["state_dict"]["net.1.running_var"].dtype == torch.float32  # BatchNorm statistics saved fp32
    torch.manual_seed(123)  # the user's RNG does not feed the rounding stream
    resumed = fit(tmp_path / "c", "adamw", plugin(), epochs=4, ckpt=str(tmp_path / "half.ckpt"))[0]
    assert torch.equal(flat(resumed), full)
    assert resumed.net[1].running_var.dtype == torch.float32 and torch.equal(resumed.net[1].running_var, stats)


def test_skipped_steps_touch_nothing(tmp_path):
    """fp16 with a loss scale that overflows every step: no parameter, state or rounding draw changes."""
    plugin = PureHalfPrecision("float16", compute="native", loss_scale="dynamic", init_scale=2.0**100)
    model = Tiny("sgd")
    before = flat(model.half())
    model, trainer = fit(tmp_path, "sgd", plugin, epochs=1, model=model)
    assert plugin.scaler.skipped_steps == len(loader())
    assert torch.equal(flat(model), before) and not trainer.optimizers[0].state
    assert plugin.fp32_step.seed is None and "rounding_generators" not in plugin.state_dict()


class Custom(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad, alpha=-group["lr"])


def test_unsupported_optimizers_are_named():
    step = Fp32Step("stochastic", torch.bfloat16)
    p = nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match=r"does not support LBFGS: .*update='nearest'"):
        step.step(torch.optim.LBFGS([p]))
    with pytest.raises(TypeError, match=r"steps a torch.optim.Optimizer; got object"):
        step.step(object())
    with pytest.warns(UserWarning, match=r"runs Custom.step on fp32 copies"):
        step.step(Custom([p]))
    assert p.dtype == torch.bfloat16 and float(p[0]) == pytest.approx(0.9, abs=4e-3)
    with pytest.raises(ValueError, match=r"update='round' is not supported; allowed: \['auto', 'nearest', "):
        PureHalfPrecision("bfloat16", update="round")


class Rebinding(Custom):
    """Replaces ``p.data`` instead of updating it in place: its result would never reach the 16-bit weight."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data = p.data - group["lr"] * p.grad


def test_an_optimizer_that_rebinds_data_is_refused_and_the_weights_are_kept():
    p = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    opt = Rebinding([p])
    with pytest.warns(UserWarning, match="runs Rebinding.step on fp32 copies"), \
            pytest.raises(TypeError, match=r"Rebinding.step replaced the parameter's .data; .*update='nearest'"):
        Fp32Step("stochastic", torch.bfloat16).step(opt)
    assert opt.param_groups[0]["params"][0] is p and p.dtype == torch.bfloat16 and torch.equal(p, torch.ones_like(p))


def test_auto_update_is_kahan_for_fp16_and_stochastic_for_bf16():
    """The defaults measured best per dtype (vit + SGD, 3 seeds: docs/pure16.md)."""
    assert PureHalfPrecision("float16").fp32_step.update == "kahan"
    assert PureHalfPrecision("bfloat16").fp32_step.update == "stochastic"
    assert PureHalfPrecision("float16", update="stochastic").fp32_step.update == "stochastic"


def test_rounding_stream_from_another_version_restarts_with_a_warning():
    """A CPU stream saved as a torch generator state (an older version) cannot feed numpy's SFC64."""
    step = Fp32Step("stochastic", torch.bfloat16)
    step.load_state_dict({"rounding_seed": 7, "rounding_generators": {"cpu": torch.Generator().get_state()}})
    with pytest.warns(UserWarning, match="starts afresh from the saved seed"):
        gen = step.generator(torch.device("cpu"))
    assert np.array_equal(gen.random_raw(4), np.random.SFC64(7).random_raw(4))
    again = Fp32Step("stochastic", torch.bfloat16)
    again.load_state_dict(step.state_dict())  # plain ints: torch.load(weights_only=True) reads them
    assert np.array_equal(again.generator(torch.device("cpu")).random_raw(4), gen.random_raw(4))


@pytest.mark.parametrize("update", ["stochastic", "kahan"])
def test_param_groups_frozen_and_fp32_params_are_each_stepped_as_torch_would(update):
    """Two groups with their own lr, a frozen 16-bit parameter (no grad) and an fp32 parameter in the same
    optimizer: only the 16-bit ones with a grad get stand-ins; each moves by its own group's lr; the groups keep
    their tensors (same objects, same order)."""
    a, b = (nn.Parameter(torch.ones(64, dtype=torch.bfloat16)) for _ in range(2))
    frozen = nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    full = nn.Parameter(torch.ones(64))
    opt = torch.optim.SGD([{"params": [a, frozen], "lr": 0.5}, {"params": [full, b], "lr": 0.25}], momentum=0.9)
    groups = [list(g["params"]) for g in opt.param_groups]
    step = Fp32Step(update, torch.bfloat16)
    for _ in range(3):
        for p in (a, b):
            p.grad = torch.full_like(p, 0.125)
        full.grad = torch.full_like(full, 0.125)
        step.step(opt)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(p) for p in g] for g in groups]
    # momentum 0.9, three steps of grad 0.125: each weight moves by lr * 0.125 * (1 + 1.9 + 2.71)
    moved = 0.125 * (1 + 1.9 + 2.71)
    assert torch.equal(frozen, torch.ones_like(frozen)) and frozen not in opt.state
    torch.testing.assert_close(full.detach(), torch.full((64,), 1 - 0.25 * moved), rtol=0, atol=1e-6)
    for p, lr in ((a, 0.5), (b, 0.25)):
        total = p.float() + (opt.state[p][KAHAN_KEY].float() if update == "kahan" else 0)
        assert p.dtype == torch.bfloat16 and opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
        assert abs(float(total.mean()) - (1 - lr * moved)) < 2e-3
