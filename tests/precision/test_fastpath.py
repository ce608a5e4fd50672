"""Eval steps of swapped Transformer layers run the swapped forwards, not torch's fused fast path."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import pytest
import torch
from lightning.pytorch.plugins.precision import Precision
from torch import nn

from lp_lightning.precision import FakeQuantPrecision, Float8Precision

PLUGINS: dict[str, Callable[[], Precision]] = {
    "fake_quant_int4": lambda: FakeQuantPrecision(weight="int4", activation=None),
    "fp8": lambda: Float8Precision(emulate=True, skip=[]),
}


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)).eval()


@pytest.mark.parametrize("name", list(PLUGINS))
def test_eval_step_runs_the_swapped_layers(name: str) -> None:
    plugin = PLUGINS[name]()
    x = torch.randn(8, 16, 64)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            float_out = _encoder()(x)
            model = plugin.convert_module(_encoder())
        finally:
            logging.disable(logging.NOTSET)
        model.train()
        swapped_out = model(x)  # training mode never takes the fast path: the swapped layers run
        model.eval()
    assert (swapped_out - float_out).abs().max() > 1e-3  # the swap changes the numbers
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.inference_mode(), plugin.forward_context():  # how Lightning runs validate/test/predict
        assert not torch.backends.mha.get_fastpath_enabled()
        eval_out = model(x)
    assert torch.backends.mha.get_fastpath_enabled()  # restored
    torch.testing.assert_close(eval_out, swapped_out)
