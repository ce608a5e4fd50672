"""Range statistics against a dtype: exact counts on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from lp_lightning.audit.overflow import tensor_stats

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_stats_in_own_dtype(dtype: torch.dtype) -> None:
    info = torch.finfo(dtype)
    values = [0.0, 0.0, info.tiny / 4, info.tiny, 1.0, -2.5, info.max * 0.75, INF, NAN, -INF]
    stats = tensor_stats(torch.tensor(values, dtype=dtype))
    assert stats["nonfinite"] == 3
    assert stats["underflow_share"] == pytest.approx(1 / 5)  # one subnormal among 5 nonzero finite values
    assert stats["overflow_share"] == pytest.approx(3 / 10)  # 0.75 max, +inf, -inf
    assert stats["amax"] == pytest.approx(float(torch.tensor(info.max * 0.75, dtype=dtype)), rel=1e-6)


def test_fp32_tensor_measured_against_fp16() -> None:
    t = torch.tensor([1e-6, 1e-3, 4e4, -5e4, 0.0])
    own = tensor_stats(t)
    as16 = tensor_stats(t, "float16")
    assert own["underflow_share"] == 0 and own["overflow_share"] == 0
    assert as16["underflow_share"] == pytest.approx(1 / 4)
    assert as16["overflow_share"] == pytest.approx(2 / 5)
    assert as16["amax"] == 5e4 and as16["nonfinite"] == 0


def test_empty_and_all_nonfinite() -> None:
    assert tensor_stats(torch.empty(0, dtype=torch.float16)) == {
        "nonfinite": 0, "underflow_share": 0.0, "overflow_share": 0.0, "amax": 0.0}
    stats = tensor_stats(torch.tensor([NAN, NAN]))
    assert stats["nonfinite"] == 2 and stats["amax"] == 0.0 and stats["overflow_share"] == 0.0


def test_bad_dtype() -> None:
    with pytest.raises(ValueError, match="dtype='int8'"):
        tensor_stats(torch.ones(2), "int8")
