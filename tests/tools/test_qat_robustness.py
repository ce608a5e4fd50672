"""tools/bench/qat_robustness.py: the table, the issue-17 bars and the torch.ao wrapper (no training)."""

from __future__ import annotations

import pytest
import torch

from lp_lightning.tools.bench import qat_robustness as qr

RUNS = {
    0: {"fp32": 0.98, "int8_qat": 0.97, "int8_converted": 0.97, "int8_agreement": 1.0, "int8_onnx": 0.97,
        "int8_onnx_agreement": 0.995, "int4w_converted": 0.96, "ao_qat": 0.95, "ao_converted": 0.975,
        "ft_int8_converted": 0.98, "ft_int8_agreement": 1.0, "ft_ao_converted": 0.975},
    1: {"fp32": 0.96, "int8_qat": 0.95, "int8_converted": 0.95, "int8_agreement": 0.98, "int8_onnx": 0.95,
        "int8_onnx_agreement": 1.0, "int4w_converted": 0.90, "ao_qat": 0.96, "ao_converted": 0.96,
        "ft_int8_converted": 0.96, "ft_int8_agreement": 1.0, "ft_ao_converted": 0.95},
}


def result() -> dict:
    return {"m": {"summary": qr.summarize(RUNS), "speed": {"fp32_ms": 2.0, "int8_ratio": 1.25, "ao_ratio": 1.9}}}


def test_summarize_is_mean_and_worst_seed() -> None:
    s = qr.summarize(RUNS)
    assert s["fp32"] == {"mean": pytest.approx(0.97), "worst": 0.96}
    assert s["int8_agreement"]["worst"] == 0.98


def test_markdown_table_rows_cells_and_ratios() -> None:
    lines = qr.markdown_table(result()).splitlines()
    assert len(lines) == 4  # header, rule, from scratch, fine-tuned
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["model", "setting", "fp32"] and "torch.ao converted" in header
    scratch = [c.strip() for c in lines[2].strip("|").split("|")]
    assert len(scratch) == len(header)
    assert scratch[:4] == ["m", "from scratch", "0.970 / 0.960", "0.960 / 0.950"]
    assert scratch[header.index("agreement (min)")] == "0.980"
    assert scratch[-2:] == ["1.25x", "1.90x"]
    tuned = [c.strip() for c in lines[3].strip("|").split("|")]
    assert tuned[header.index("int8 converted")] == "0.970 / 0.960"
    assert tuned[header.index("int4w QAT")] == "" and tuned[-2:] == ["", ""]  # no fine-tuned int4w, no timing


def test_markdown_table_without_fine_tuning() -> None:
    runs = {s: {k: v for k, v in r.items() if not k.startswith("ft_")} for s, r in RUNS.items()}
    assert len(qr.markdown_table({"m": {"summary": qr.summarize(runs)}}).splitlines()) == 3


def test_misses_names_each_bar_missed() -> None:
    missed = qr.misses(result())
    assert any("int4w converted mean: 4.0 points below fp32 (bar 2)" in m for m in missed)
    assert any("int4w converted worst: 6.0" in m for m in missed)
    assert "m from scratch int8 converted mean 0.960 behind torch.ao 0.968" in missed
    assert "m from scratch int8 converted worst 0.950 behind torch.ao 0.960" in missed
    assert any("int8_agreement worst 0.980 < 0.99" in m for m in missed)
    assert not any("fine-tuned" in m for m in missed)  # fine-tuned int8 within 1 point, ahead of torch.ao
    assert not any("step" in m for m in missed)
    slow = result()
    slow["m"]["speed"]["int8_ratio"] = 1.4
    assert "m int8 step 1.40x fp32 (goal <= 1.3x)" in qr.misses(slow)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_ao_prepare_keeps_the_modules_steps() -> None:
    module, _ = qr.build("dscnn", 0)
    x = torch.rand(4, 1, 8, 8)
    ao = qr.ao_prepare(module, x)
    assert ao is module and isinstance(ao, type(module).__mro__[1])
    assert {n for n, _ in ao.named_children()} == {"ao_graph"}
    assert all(n.startswith("ao_graph.") for n, _ in ao.named_parameters())
    loss = ao.training_step((x, torch.zeros(4, dtype=torch.long), torch.arange(4)), 0)
    loss.backward()
    assert all(p.grad is not None for p in ao.parameters())


def test_build_rejects_an_unknown_model() -> None:
    with pytest.raises(ValueError, match="model='nope' is unknown"):
        qr.build("nope", 0)
