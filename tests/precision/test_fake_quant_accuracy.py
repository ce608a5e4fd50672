"""Digits accuracy targets of QAT with the shipped configs (lp-train defaults): slow, minutes per model.

cnn and vit: ``precision=int8`` (w8a8) within 1 point of fp32 test accuracy, ``precision=int4w`` within 3.
Run with ``pytest -m slow tests/precision/test_fake_quant_accuracy.py -s`` (prints the numbers).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lp_lightning.train import run
from tests.conftest import compose_train

TOLERANCE = {"int8": 0.01, "int4w": 0.03}


@pytest.mark.slow
@pytest.mark.parametrize("net", ["cnn", "vit"])
def test_qat_accuracy_is_close_to_fp32(tmp_path: Path, net: str) -> None:
    acc = {}
    for precision in ("fp32", "int8", "int4w"):
        cfg = compose_train([f"model={net}", f"precision={precision}", "trainer.enable_progress_bar=false"])
        acc[precision] = run(cfg, tmp_path / precision, precision)["test_acc"]
    print(f"{net} digits test accuracy: {acc}")
    for precision, tol in TOLERANCE.items():
        assert acc[precision] >= acc["fp32"] - tol, f"{net} {precision}: {acc[precision]:.4f} vs fp32 {acc['fp32']:.4f}"
