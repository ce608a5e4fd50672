"""Small in-memory ONNX graphs shared by the export tests."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from lp_lightning.export.onnx_fp32 import to_onnx
from lp_lightning.models import Classifier


def tiny_classifier(net: str, seed: int = 0, **net_kwargs) -> Classifier:
    """An untrained fp32 Classifier for 8x8 digits images (eval mode)."""
    torch.manual_seed(seed)
    return Classifier(net=net, input_shape=[1, 8, 8], num_classes=10, net_kwargs=net_kwargs).eval()


@pytest.fixture(scope="session")
def onnx_models() -> dict[str, tuple[Classifier, onnx.ModelProto]]:
    """(torch model, in-memory ONNX model) for a small mlp and cnn."""
    out = {}
    for net, kw in (("mlp", {"hidden": [64, 32]}), ("cnn", {"channels": [8, 16]})):
        model = tiny_classifier(net, **kw)
        out[net] = (model, cached_to_onnx(model, torch.randn(2, 1, 8, 8)))
    return out


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


_PROTO_CACHE: dict[tuple[float, ...], onnx.ModelProto] = {}


def cached_to_onnx(model: torch.nn.Module, sample: torch.Tensor) -> onnx.ModelProto:
    """``to_onnx`` memoized on the model's weights: tests that re-export one checkpoint trace it once."""
    key = tuple(float(p.double().sum()) for p in model.state_dict().values() if p.is_floating_point())
    if key not in _PROTO_CACHE:
        _PROTO_CACHE[key] = to_onnx(model, sample)
    out = onnx.ModelProto()
    out.CopyFrom(_PROTO_CACHE[key])
    return out


@pytest.fixture
def fast_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``run_export`` reuse earlier traces of the same weights (the dynamo export is the slow step)."""
    from lp_lightning.export import pipeline

    monkeypatch.setattr(pipeline, "to_onnx", cached_to_onnx)
