"""Edge-inference checks (``edge=true``): what an ORT Mobile user runs next, on every exported format.

Per format: onnxruntime's mobile usability check for NNAPI and CoreML (:mod:`lp_lightning.export.mobile`),
fixed-shape variants at the latency batch sizes (``make_dynamic_shape_fixed``'s Python functions), and the
ORT-format model with its reduced-operator config (``convert_onnx_models_to_ort``). Every variant is re-run
in onnxruntime against the PyTorch model; :func:`check_edge` lists the ones below their format's threshold.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

from lp_lightning.cli import one_line
from lp_lightning.export.evaluate import SessionConfig, logit_metrics, predict, session
from lp_lightning.export.graph import ExportError, save_model
from lp_lightning.export.mobile import mobile_usability, summary_line
from lp_lightning.logs import quiet_loggers

Log = Callable[[str], None]
ORT_TARGET_PLATFORM = "arm"  # what phones run: QDQ kept as int8 x int8 (session.qdqisint8allowed=1)
_COMPACT_KEYS = ("nodes", "supported_nodes", "partitions", "verdict")


def fixed_shape_name(fmt: str, batch: int) -> str:
    """File name of a format's fixed-shape variant."""
    return f"model_{fmt}_b{batch}.onnx"


def ort_names(fmt: str) -> tuple[str, str]:
    """File names of a format's ORT-format model and its reduced-operator config."""
    return f"model_{fmt}.ort", f"model_{fmt}.required_operators.config"


def make_fixed_shape(path: str | os.PathLike[str], out: str | os.PathLike[str], batch: int) -> Path:
    """Write the model at ``path`` with its (first) input's batch dimension fixed to ``batch``, output shapes
    fixed where inference can tell, what ``python -m onnxruntime.tools.make_dynamic_shape_fixed`` does."""
    model = onnx.load(str(path))
    graph_input = model.graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    rest = [d.dim_value for d in dims[1:]]
    if any(v <= 0 for v in rest):
        raise ExportError(f"edge: input {graph_input.name!r} of {Path(path).name} has dynamic non-batch dimensions "
                          f"{[d.dim_param or d.dim_value for d in dims]}; only the batch dimension can be fixed")
    make_input_shape_fixed(model.graph, graph_input.name, [int(batch), *rest])
    fix_output_shapes(model)
    return save_model(model, out)


def widen_int4(model: onnx.ModelProto) -> int:
    """Store every INT4 initializer as INT8 (the same values), in place; returns how many.

    The ORT format of onnxruntime 1.32 has no INT4 tensor type: a converted model with INT4 initializers is
    written but fails to load ("Unsupported tensor data type"). DequantizeLinear accepts int8 alike.
    """
    count = 0
    for i, init in enumerate(model.graph.initializer):
        if init.data_type == TensorProto.INT4:
            values = numpy_helper.to_array(init).astype(np.int8)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(values, init.name))
            count += 1
    return count


def convert_to_ort(path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``convert_onnx_models_to_ort`` on one model (fixed optimizations, ARM target), its printing and logging
    silenced; returns the ``.ort`` file and the reduced-operator ``.config`` it writes into ``out_dir``."""
    from onnxruntime.tools.convert_onnx_models_to_ort import (  # its import configures logging: only when used
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    src, dst = Path(path), Path(out_dir)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), quiet_loggers("ort_format_model.utils", level=logging.ERROR):
            convert_onnx_models_to_ort(src, output_dir=dst, optimization_styles=[OptimizationStyle.Fixed],
                                       target_platform=ORT_TARGET_PLATFORM)
    except Exception as exc:  # onnxruntime raises RuntimeError/Fail/...; name the step, the model and the cause
        raise ExportError(f"edge: ORT-format conversion of {src.name} failed: {type(exc).__name__}: "
                          f"{one_line(exc, limit=300)}") from exc
    ort_file, config = (dst / n for n in (f"{src.stem}.ort", f"{src.stem}.required_operators.config"))
    if not ort_file.is_file() or not config.is_file():
        raise ExportError(f"edge: ORT-format conversion of {src.name} wrote no {ort_file.name}/{config.name}")
    return ort_file, config


def required_operators(config: str | os.PathLike[str]) -> list[str]:
    """``domain;opset;Op`` entries of a reduced-operator config, one per operator, e.g. ``ai.onnx;17;Gemm``."""
    ops = []
    for line in Path(config).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            domain, opset, names = line.split(";", 2)
            ops += [f"{domain};{opset};{op}" for op in names.split(",") if op]
    return sorted(ops)


def _variant(logits: np.ndarray, splits: tuple[np.ndarray | None, np.ndarray], others: Mapping[str, np.ndarray],
             final: Path, staged: Path) -> dict[str, Any]:
    y, ref = splits
    return {"path": str(final), "size_bytes": os.path.getsize(staged), **logit_metrics(logits, y, ref, others)}


def edge_format(fmt: str, path: Path, work: Path, out: Path, x: np.ndarray, y: np.ndarray | None, ref: np.ndarray,
                others: Mapping[str, np.ndarray], batch_sizes: Sequence[int], threads: int,
                config: SessionConfig | None) -> tuple[dict[str, Any], dict[str, Path]]:
    """The ``edge`` entry of one format's model at ``path`` and its staged files (final name -> staged path).

    Variants are written into ``work``; their report paths name their final place under ``out``.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    files: dict[str, Path] = {}
    variants: dict[str, dict[str, Any]] = {}
    for batch in dict.fromkeys(int(b) for b in batch_sizes):
        name = fixed_shape_name(fmt, batch)
        files[name] = make_fixed_shape(path, work / name, batch)
        logits = predict(session(files[name], threads, config=config), x, chunk=batch, fixed=True)
        variants[f"b{batch}"] = {"kind": "fixed_shape", "batch_size": batch,
                                 **_variant(logits, (y, ref), others, out / name, files[name])}
        usability = mobile_usability(files[name])["providers"]
        variants[f"b{batch}"]["providers"] = {k: {c: e[c] for c in _COMPACT_KEYS} for k, e in usability.items()}
    ort_dir = work / f"ort_{fmt}"
    source = onnx.load(str(path))
    widened = widen_int4(source)
    if widened:  # the ORT format cannot hold INT4: convert an int8-stored copy of the same weights
        path = save_model(source, work / f"ort_src_{fmt}" / path.name)
    ort_file, ort_config = convert_to_ort(path, ort_dir)
    ort_name, config_name = ort_names(fmt)
    files[ort_name], files[config_name] = ort_file, ort_config
    logits = predict(session(ort_file, threads), x)
    variants["ort"] = {"kind": "ort_format", "target_platform": ORT_TARGET_PLATFORM,
                       "int4_initializers_stored_as_int8": widened,
                       **_variant(logits, (y, ref), others, out / ort_name, ort_file),
                       "config_path": str(out / config_name), "required_operators": required_operators(ort_config)}
    return {**mobile_usability(path), "variants": variants}, files


def edge_checks(paths: Mapping[str, Path], work: Path, out: Path, x: np.ndarray, y: np.ndarray | None,
                ref: np.ndarray, others: Mapping[str, np.ndarray], batch_sizes: Sequence[int], threads: int,
                configs: Mapping[str, SessionConfig], log: Log) -> tuple[dict[str, Any], dict[str, Path]]:
    """:func:`edge_format` for every staged format; logs one summary line per format."""
    report: dict[str, Any] = {}
    files: dict[str, Path] = {}
    for fmt, path in paths.items():
        log(f"[lp-export] {fmt}: edge checks (NNAPI/CoreML usability, fixed batch {list(batch_sizes)}, ORT format)")
        report[fmt], staged = edge_format(fmt, path, work, out, x, y, ref, others, batch_sizes, threads,
                                          configs.get(fmt))
        files.update(staged)
        log(summary_line(fmt, report[fmt]))
    return report, files


def check_edge(edge: Mapping[str, Mapping[str, Any]], thresholds: Mapping[str, float], parity_atol: float
               ) -> list[str]:
    """Messages for every edge variant below its format's agreement threshold, with Lemma-1 violations, or,
    for fp32, farther than ``parity_atol`` from PyTorch (the fp32 parity check)."""
    failures = []
    for fmt, entry in edge.items():
        need = thresholds.get(fmt)
        for key, v in entry["variants"].items():
            label = f"{fmt} ({'ORT format' if key == 'ort' else f'fixed shape {key}'})"
            if need is not None and v["agreement"] < need:
                failures.append(f"{label}: agreement {v['agreement']:.4f} < threshold {need:.4f}")
            if v.get("violations"):
                failures.append(f"{label}: {v['violations']} Lemma-1 violations (certified but disagreeing)")
            if fmt == "fp32" and not v["max_abs_logit_diff"] <= parity_atol:
                failures.append(f"{label}: max |dlogit| {v['max_abs_logit_diff']:.3g} > parity_atol {parity_atol:g}")
    return failures
