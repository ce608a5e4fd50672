"""Tolerance audit numerics (Lemma 1): property test, exact oracles, bad input, plot file."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lp_lightning.audit.plot import plot_comparison
from lp_lightning.audit.tolerance import (
    REPORT_KEYS,
    certificate,
    compare,
    error,
    probabilities,
    summarize,
    tolerance,
)

weights = st.lists(st.floats(0.0, 1.0, allow_subnormal=False), min_size=2, max_size=12).filter(
    lambda w: sum(w) > 1e-6)


def _probs(w: list[float]) -> torch.Tensor:
    t = torch.tensor(w, dtype=torch.float64)
    return (t / t.sum())[None]


@settings(max_examples=300, deadline=None)
@given(w=weights, err=st.floats(0.0, 0.5), data=st.data())
def test_certified_sample_never_changes_top1(w: list[float], err: float, data: st.DataObject) -> None:
    p = _probs(w)
    d = torch.tensor(data.draw(st.lists(st.floats(-err, err), min_size=len(w), max_size=len(w))),
                     dtype=torch.float64)
    q = p + d[None]  # any perturbation bounded by err (q need not even be a probability vector)
    e = error(q, p)
    assert float(e) <= err + 1e-15  # q = p + d is rounded: the measured error may exceed |d| by an ulp
    if bool(certificate(tolerance(p), e)):
        assert int(q.argmax()) == int(p.argmax())
    if bool(certificate(tolerance(p), torch.tensor([err], dtype=torch.float64))):  # the bound, not the value
        assert int(q.argmax()) == int(p.argmax())


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.0, 2.0), n=st.integers(1, 40), c=st.integers(1, 10),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_summary_never_reports_violations(seed: int, scale: float, n: int, c: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, c, generator=g, dtype=torch.float64) * 4
    low = (ref + scale * torch.randn(n, c, generator=g, dtype=torch.float64)).to(dtype)
    r = summarize(low, ref)
    assert r["violations"] == 0
    assert 0.0 <= r["certified_fraction"] <= r["agreement"] <= 1.0
    assert r["n_samples"] == n and r["nonfinite"] == 0


def test_exact_oracle_three_classes() -> None:
    ref = torch.tensor([[0.7, 0.2, 0.1], [0.45, 0.5, 0.05], [0.55, 0.35, 0.1]], dtype=torch.float64)
    low = torch.tensor([[0.6, 0.3, 0.1], [0.55, 0.4, 0.05], [0.45, 0.45, 0.1]], dtype=torch.float64)
    tol, err = tolerance(ref), error(low, ref)
    torch.testing.assert_close(tol, torch.tensor([0.5, 0.05, 0.2], dtype=torch.float64))
    torch.testing.assert_close(err, torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64))
    # 0.5 > 0.2 certified; 0.05 < 0.2 not; tol == 2*err is not certified (strict inequality)
    assert certificate(tol, err).tolist() == [True, False, False]
    assert not bool(certificate(torch.tensor([0.2], dtype=torch.float64), torch.tensor([0.1], dtype=torch.float64)))
    r = summarize(ref.log(), ref.log())
    assert r["certified_fraction"] == 1.0 and r["err_max"] == pytest.approx(0.0, abs=1e-15)
    r = summarize(low.log(), ref.log())  # softmax(log p) == p
    assert r["n_samples"] == 3 and r["violations"] == 0
    assert r["certified_fraction"] == pytest.approx(1 / 3)
    assert r["agreement"] == pytest.approx(2 / 3)  # row 2 flips; row 3 ties in low, argmax 0 == 0
    assert r["err_max"] == pytest.approx(0.1) and r["err_mean"] == pytest.approx(0.1)
    assert r["tol_mean"] == pytest.approx(0.75 / 3) and r["tol_median"] == pytest.approx(0.2)


def test_report_keys_types_and_percentiles() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(200, 5, generator=g)
    low = ref + 0.3 * torch.randn(200, 5, generator=g)
    r = summarize(low, ref)
    assert tuple(r) == REPORT_KEYS
    for key in ("n_samples", "violations", "nonfinite"):
        assert type(r[key]) is int
    for key in set(REPORT_KEYS) - {"n_samples", "violations", "nonfinite"}:
        assert type(r[key]) is float
    c = compare(low, ref)
    assert r["err_p99"] == pytest.approx(float(np.percentile(c.err.numpy(), 99)))
    assert r["tol_median"] == pytest.approx(float(np.median(c.tol.numpy())))
    assert r["agreement"] == pytest.approx(float((low.argmax(1) == ref.argmax(1)).double().mean()))


def test_binary_one_logit_is_two_classes() -> None:
    ref = torch.tensor([[0.0], [math.log(3.0)], [-2.0]])
    p = probabilities(ref)
    torch.testing.assert_close(p[:2], torch.tensor([[0.5, 0.5], [0.25, 0.75]], dtype=torch.float64))
    torch.testing.assert_close(tolerance(p)[:2], torch.tensor([0.0, 0.5], dtype=torch.float64))
    low = torch.tensor([[0.1], [math.log(3.0)], [2.0]])
    r = summarize(low, ref)
    assert r["n_samples"] == 3 and r["violations"] == 0
    assert r["agreement"] == pytest.approx(1 / 3)  # 0.0 vs 0.1 flips the tie, -2 vs 2 flips
    assert r["certified_fraction"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_counted_never_certified_and_disagrees(bad: float) -> None:
    ref = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    low = ref.clone().half()
    low[1, 0] = bad
    r = summarize(low, ref)
    assert r["nonfinite"] == 1
    assert r["certified_fraction"] == pytest.approx(2 / 3) and r["agreement"] == pytest.approx(2 / 3)
    assert r["violations"] == 0 and r["err_max"] == 1.0
    assert all(math.isfinite(v) for v in r.values())
    c = compare(ref, low)  # non-finite reference: also counted
    assert not bool(c.certified[1]) and not bool(c.agree[1]) and float(c.tol[1]) == 0.0


@pytest.mark.parametrize(("low", "ref", "match"), [
    (torch.zeros(4), torch.zeros(4), r"\(N, C\).*\(4,\)"),
    (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), r"\(2, 3, 4\)"),
    (torch.zeros(2, 0), torch.zeros(2, 0), r"C >= 1.*\(2, 0\)"),
    (torch.zeros(2, 3), torch.zeros(3, 3), r"same.*\(2, 3\) and \(3, 3\)"),
    (torch.zeros(0, 3), torch.zeros(0, 3), "empty"),
])
def test_bad_shapes_name_the_shape(low: torch.Tensor, ref: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        summarize(low, ref)


def test_integer_logits_rejected() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        summarize(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3))


def test_plot_writes_png(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(50, 4, generator=g) * 3
    low = (ref + 0.2 * torch.randn(50, 4, generator=g)).half()
    low[0, 0] = float("inf")
    out = plot_comparison(compare(low, ref), tmp_path / "sub" / "audit.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["audit.png"]  # no temp file left behind
