"""fp32 ONNX export: torch.onnx.export (dynamo), dynamic batch, weights inside the file, parity check."""

from __future__ import annotations

import inspect
import io
import logging
import os
import tempfile
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from lp_lightning.export.graph import ExportError, save_model
from lp_lightning.logs import quiet_loggers

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def to_onnx(model: nn.Module, sample: torch.Tensor) -> onnx.ModelProto:
    """Trace ``model`` (fp32, eval) to an in-memory ModelProto with a dynamic batch dimension.

    Node metadata (module name scopes) is kept in memory so the INT8 path can map layers to nodes;
    :func:`~lp_lightning.export.graph.save_model` strips it when writing.
    """
    model = model.float().eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    first_arg = next(iter(inspect.signature(model.forward).parameters))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), \
            quiet_loggers("", "torch.onnx", "torch.export", "onnxscript", level=logging.ERROR), \
            redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(model, (sample.float(),), str(path), input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_shapes={first_arg: {0: batch}},
                              external_data=False, dynamo=True, verbose=False)
        except Exception as exc:  # the exporter raises many types; name the step and keep the cause
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") \
                from exc
        return onnx.load(str(path))


def run_onnx(model: onnx.ModelProto | str | os.PathLike[str], x: np.ndarray, threads: int = 1,
             chunk: int = 256) -> np.ndarray:
    """Logits of an ONNX model on onnxruntime's CPU provider, evaluated in chunks of ``chunk`` rows."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i:i + chunk]})[0] for i in range(0, len(x), chunk)]
    return np.concatenate(outs).astype(np.float32)


def parity(model: nn.Module, onnx_model: onnx.ModelProto | str | os.PathLike[str], x: torch.Tensor) -> float:
    """Max abs logit difference between the PyTorch model and the ONNX model on ``x``."""
    with torch.no_grad():
        ref = model.float().eval()(x.float()).float().numpy()
    return float(np.abs(run_onnx(onnx_model, x.float().numpy()) - ref).max())


def check_parity(model: nn.Module, proto: onnx.ModelProto, x: torch.Tensor, atol: float = 1e-4) -> float:
    """Max abs logit difference at batch 1 and on all of ``x``; raises :class:`ExportError` above ``atol``."""
    diff = max(parity(model, proto, x[:1]), parity(model, proto, x))
    if not np.isfinite(diff) or diff > atol:
        raise ExportError(f"fp32 ONNX parity check failed: max abs logit difference {diff:.3g} > atol={atol:g}")
    return diff


def export_fp32(model: nn.Module, sample: torch.Tensor, path: str | os.PathLike[str],
                atol: float = 1e-4) -> tuple[onnx.ModelProto, float]:
    """Export ``model`` to ``path`` after a parity check on ``sample`` (nothing is written if it fails).

    Returns the in-memory ModelProto (with metadata, for the INT8 layer mapping) and the difference.
    """
    proto = to_onnx(model, sample[:2])
    diff = check_parity(model, proto, sample, atol)
    save_model(proto, path)
    return proto, diff
