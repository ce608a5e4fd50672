"""Prove exported models on onnxruntime's CPU provider: accuracy, agreement, Lemma-1 audit, size, latency."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from lp_lightning.audit.tolerance import summarize
from lp_lightning.export.graph import file_size, op_types

SessionConfig = Mapping[str, str]


def session(path: str | os.PathLike[str], threads: int = 1, optimized_path: str | os.PathLike[str] | None = None,
            config: SessionConfig | None = None) -> ort.InferenceSession:
    """A CPU session with a fixed thread count (sequential, one inter-op thread); optionally saves the
    graph after onnxruntime's optimizations to ``optimized_path``; ``config``: session config entries."""
    opts = ort.SessionOptions()
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def optimized_op_types(path: str | os.PathLike[str], threads: int = 1, config: SessionConfig | None = None
                       ) -> list[str]:
    """Op types of the graph onnxruntime actually runs (after its optimizations), e.g. QGemm, MatMulNBits."""
    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        session(path, threads, optimized_path=opt, config=config)
        return op_types(onnx.load(str(opt)))


def predict(sess: ort.InferenceSession, x: np.ndarray, chunk: int = 256, fixed: bool = False) -> np.ndarray:
    """Logits of ``x`` (float32) in chunks; ``fixed``: every chunk has exactly ``chunk`` rows (a fixed-shape
    model), the last one padded with repeated rows whose logits are dropped."""
    name = sess.get_inputs()[0].name
    n = len(x)
    if fixed and n % chunk:
        x = np.resize(x, (n + chunk - n % chunk, *x.shape[1:]))
    return np.concatenate([sess.run(None, {name: x[i:i + chunk]})[0] for i in range(0, len(x), chunk)])[:n]


def evaluate_format(path: str | os.PathLike[str], x: np.ndarray, y: np.ndarray | None, ref_logits: np.ndarray,
                    threads: int = 1, other_refs: Mapping[str, np.ndarray] | None = None,
                    config: SessionConfig | None = None) -> dict[str, Any]:
    """Quality of one ONNX model on the test split against the PyTorch fp32 model's logits ``ref_logits``.

    ``y`` None (no labels): ``accuracy`` is None.
    ``other_refs`` (e.g. ``{"fake_quant": logits}``) add ``agreement_<name>`` and ``max_abs_logit_diff_<name>``.
    """
    logits = predict(session(path, threads, config=config), np.ascontiguousarray(x, dtype=np.float32))
    return {
        **logit_metrics(logits, y, ref_logits, other_refs),
        "path": str(path),
        "size_bytes": file_size(path),
        "op_types": optimized_op_types(path, threads, config),
    }


def logit_metrics(logits: np.ndarray, y: np.ndarray | None, ref_logits: np.ndarray,
                  other_refs: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Accuracy, top-1 agreement, Lemma-1 audit and max |dlogit| of ``logits`` against ``ref_logits``."""
    logits = logits.astype(np.float32)
    audit = summarize(torch.from_numpy(logits), torch.from_numpy(ref_logits.astype(np.float32)))
    finite = np.isfinite(logits).all(axis=1)  # a row with inf/nan predicts nothing (as the Lemma-1 audit counts it)
    pred = np.where(finite, np.nan_to_num(logits).argmax(1), -1)
    extra: dict[str, float] = {}
    for name, other in (other_refs or {}).items():
        extra[f"agreement_{name}"] = float((pred == other.argmax(1)).mean())
        extra[f"max_abs_logit_diff_{name}"] = _max_abs_diff(logits, other, finite)
    return {
        **extra,
        "accuracy": None if y is None else float((pred == y).mean()),
        "agreement": float((pred == ref_logits.argmax(1)).mean()),
        "certified_fraction": float(audit["certified_fraction"]),
        "violations": int(audit["violations"]),
        "max_abs_logit_diff": _max_abs_diff(logits, ref_logits, finite),
        "nonfinite": int((~finite).sum()),
        "n_samples": len(logits),
    }


def _max_abs_diff(logits: np.ndarray, ref: np.ndarray, finite: np.ndarray) -> float:
    """Largest |logit difference| over the rows with finite logits (``nonfinite`` counts the others)."""
    return float(np.abs(logits[finite] - ref[finite]).max()) if finite.any() else float("nan")


def measure_latency(paths: Mapping[str, str | os.PathLike[str]], inputs: Mapping[int, np.ndarray],
                    threads: int = 1, warmup: int = 5, iters: int = 30,
                    configs: Mapping[str, SessionConfig] | None = None) -> dict[str, dict[int, dict[str, float]]]:
    """Latency percentiles (ms) per model and batch size, models timed interleaved in one run.

    Every model is warmed up first; then each round runs each (model, batch) once in turn, so load
    spikes from other processes hit all models alike. Returns ``{name: {batch: {"p50", "p90"}}}``.
    """
    configs = configs or {}
    sessions = {name: session(p, threads, config=configs.get(name)) for name, p in paths.items()}
    feeds = {name: {b: {s.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)}
                    for b, x in inputs.items()} for name, s in sessions.items()}
    for name, s in sessions.items():
        for feed in feeds[name].values():
            for _ in range(warmup):
                s.run(None, feed)
    times: dict[str, dict[int, list[float]]] = {n: {b: [] for b in inputs} for n in sessions}
    for _ in range(iters):
        for b in inputs:
            for name, s in sessions.items():
                start = time.perf_counter()
                s.run(None, feeds[name][b])
                times[name][b].append((time.perf_counter() - start) * 1e3)
    return {n: {b: {"p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90))}
                for b, t in per_b.items()} for n, per_b in times.items()}


def latency_inputs(x: np.ndarray, batch_sizes: Sequence[int]) -> dict[int, np.ndarray]:
    """Inputs of each batch size cut from (and tiled over) the test images."""
    out = {}
    for b in batch_sizes:
        if b < 1:
            raise ValueError(f"latency batch size {b!r} must be >= 1")
        reps = -(-b // len(x))
        out[int(b)] = np.ascontiguousarray(np.concatenate([x] * reps)[:b], dtype=np.float32)
    return out
