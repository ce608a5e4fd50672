"""Epsilon safety rule: statuses, the safe value's derivation, every known optimizer, run-time stats."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lp_lightning.audit.epsilon import (
    EPS_OPTIMIZERS,
    check_optimizer,
    eps_status,
    fix_optimizer,
    max_update_ratio,
    moment_stats,
    optimizer_params,
    round_to,
    safe_eps,
    snapshot,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
EPS_VALUES = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-10, 1e-12]


@pytest.mark.parametrize(("eps", "expected"), [
    (1e-2, "ok"), (1e-3, "ok"), (2.0**-12, "ok"), (1e-4, "below_safe"), (1e-5, "subnormal"),
    (1e-7, "subnormal"), (1e-8, "zero"), (0.0, "zero")])
def test_fp16_statuses(eps: float, expected: str) -> None:
    assert eps_status(eps, torch.float16) == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("eps", EPS_VALUES)
def test_bf16_and_fp32_never_flag_usual_eps(dtype: torch.dtype, eps: float) -> None:
    assert eps_status(eps, dtype) == "ok"
    assert eps_status(eps, dtype, "inside_sqrt") == "ok"


@pytest.mark.parametrize("dtype", DTYPES)
def test_safe_eps_bounds_the_step_of_every_underflowing_gradient(dtype: torch.dtype) -> None:
    """Oracle for the derivation: the largest g whose square rounds to 0 in ``dtype`` gives |g| / eps <= 1
    at the safe eps, and > 1 at half of it (so the safe value is the smallest power of two that works)."""
    safe = safe_eps(dtype)
    assert safe >= torch.finfo(dtype).tiny and round_to(safe, dtype) == safe
    assert math.log2(safe).is_integer()
    g = torch.tensor(1.0, dtype=dtype)
    while (g * g).item() != 0.0:  # walk down to the largest power-of-two-ish g with g*g == 0
        g = g / 2
    candidates = torch.linspace(g.item(), 2 * g.item(), 2001, dtype=torch.float64).to(dtype)
    g_max = max(c.item() for c in candidates if (c * c).item() == 0.0)
    assert g_max / safe <= 1.0
    assert g_max / (safe / 2) > 1.0


def test_safe_eps_values_and_bad_placement() -> None:
    assert safe_eps(torch.float16) == 2.0**-12
    assert safe_eps(torch.float16, "inside_sqrt") == torch.finfo(torch.float16).tiny
    assert safe_eps(torch.bfloat16) < 1e-8
    with pytest.raises(ValueError, match="placement='nope'.*sqrt_denominator"):
        safe_eps(torch.float16, "nope")


def _optimizer(cls: type, params, **kw) -> torch.optim.Optimizer:
    if cls is torch.optim.SparseAdam:
        return cls(params, **kw)
    return cls(params, foreach=False, **kw)


KNOWN = [c for c in EPS_OPTIMIZERS if c is not torch.optim.SparseAdam]


@pytest.mark.parametrize("cls", KNOWN, ids=lambda c: c.__name__)
def test_state_names_match_torch(cls: type) -> None:
    """The spec's state keys are the ones torch creates (RMSprop's momentum buffer needs momentum > 0)."""
    lin = nn.Linear(3, 2)
    kw = {"momentum": 0.9} if cls is torch.optim.RMSprop else {}
    opt = _optimizer(cls, lin.parameters(), **kw)
    lin(torch.randn(4, 3)).sum().backward()
    opt.step()
    spec = EPS_OPTIMIZERS[cls]
    state = opt.state[lin.weight]
    assert spec.second in state
    assert spec.first is None or spec.first in state
    assert "eps" in opt.param_groups[0]


@pytest.mark.parametrize("cls", KNOWN, ids=lambda c: c.__name__)
def test_default_eps_flagged_in_fp16_and_safe_in_bf16(cls: type) -> None:
    for dtype, flagged in ((torch.float16, True), (torch.bfloat16, False), (torch.float32, False)):
        lin = nn.Linear(3, 2).to(dtype)
        checks = check_optimizer(_optimizer(cls, lin.parameters()))
        assert [c.dtype for c in checks] == [dtype]
        assert checks[0].flagged is flagged, (cls, dtype, checks[0])


SQRT_DENOM = [c for c in KNOWN if EPS_OPTIMIZERS[c].placement == "sqrt_denominator"]


@pytest.mark.parametrize("cls", SQRT_DENOM, ids=lambda c: c.__name__)
def test_lost_eps_explodes_and_fix_bounds_the_step(cls: type) -> None:
    """A gradient whose square underflows in fp16: lost eps -> non-finite step; safe eps -> |step| <= lr."""
    results = {}
    for fix in (False, True):
        p = nn.Parameter(torch.zeros(8, dtype=torch.float16))
        opt = _optimizer(cls, [p], lr=1e-3, eps=1e-8)
        if fix:
            changed = fix_optimizer(opt)
            assert [c.status for c in changed] == ["zero"] and opt.param_groups[0]["eps"] == 2.0**-12
        before = snapshot(optimizer_params(opt))
        p.grad = torch.full_like(p, 1e-4)
        opt.step()
        results[fix] = max_update_ratio(opt, before)
    if cls is not torch.optim.RAdam:  # RAdam's first steps are un-adapted (no division)
        assert results[False] == math.inf
    assert results[True] <= 1.0


def test_adamax_lost_eps_gives_nan_on_zero_gradients() -> None:
    for eps, finite in ((1e-8, False), (safe_eps(torch.float16, "grad_floor"), True)):
        p = nn.Parameter(torch.ones(4, dtype=torch.float16))
        opt = torch.optim.Adamax([p], lr=1e-3, eps=eps, foreach=False)
        p.grad = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float16)
        opt.step()
        assert bool(torch.isfinite(p).all()) is finite


def test_no_eps_and_unchecked() -> None:
    lin = nn.Linear(3, 2).half()
    assert [c.status for c in check_optimizer(torch.optim.SGD(lin.parameters(), lr=0.1))] == ["no_eps"]

    class MyAdam(torch.optim.Adam):  # a subclass may change the math: not trusted
        pass

    for opt in (MyAdam(lin.parameters()), torch.optim.Adafactor(lin.parameters())):
        checks = check_optimizer(opt)
        assert [c.status for c in checks] == ["unchecked"] and not checks[0].flagged
        assert "unchecked" in checks[0].describe()


def test_mixed_dtypes_in_a_group_and_state_dtype_wins() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, dtype=torch.float16))
    opt = torch.optim.Adam([a, b], eps=1e-8, foreach=False)
    checks = {c.dtype: c for c in check_optimizer(opt, "opt")}
    assert checks[torch.float32].status == "ok" and checks[torch.float16].status == "zero"
    assert "opt param group 0: eps=1e-08 rounds to 0 in float16" in checks[torch.float16].describe()
    fix_optimizer(opt)
    assert opt.param_groups[0]["eps"] == 2.0**-12
    # state kept in fp16 for an fp32 parameter is what the division sees
    c = nn.Parameter(torch.zeros(2))
    opt2 = torch.optim.Adam([c], eps=1e-8, foreach=False)
    opt2.state[c] = {"exp_avg_sq": torch.zeros(2, dtype=torch.float16)}
    assert check_optimizer(opt2)[0].dtype == torch.float16


def test_moment_stats_counts_squared_gradient_underflow() -> None:
    g = torch.tensor([1e-1, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 0.0, 0.0], dtype=torch.float16)
    p = nn.Parameter(torch.zeros(8, dtype=torch.float16))
    opt = torch.optim.Adam([p], eps=2.0**-12, foreach=False)
    p.grad = g.clone()
    opt.step()
    # oracle: v = (1 - beta2) * g^2 rounded to fp16 is 0 while m = (1 - beta1) * g is not
    v = (0.001 * g.double() ** 2).to(torch.float16)
    m = (0.1 * g.double()).to(torch.float16)
    expected = ((v == 0) & (m != 0)).sum().item() / (m != 0).sum().item()
    stats = moment_stats(opt)
    assert stats["v_zero_share"] == pytest.approx(expected)
    assert 0 < stats["v_zero_share"] < 1
    # sqrt(v_hat) = sqrt(v / (1 - beta2)) <= eps: the zeros, the underflowed entries, |g| <= eps
    dominated = ((v.double() / 0.001).sqrt() <= 2.0**-12).sum().item() / 8
    assert dominated == 6 / 8
    assert stats["eps_dominated_share"] == pytest.approx(dominated)


def test_max_update_ratio_is_exact_for_sgd() -> None:
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.5)
    before = snapshot([p])
    p.grad = torch.tensor([1.0, -3.0, 2.0])
    opt.step()
    assert max_update_ratio(opt, before) == pytest.approx(3.0)
    assert moment_stats(opt) == {}
