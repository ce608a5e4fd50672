"""Checkpoint -> fp32/INT8/INT4 ONNX files -> onnxruntime evaluation -> ``export_report.json``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lp_lightning.export.cpu import cpu_info
from lp_lightning.export.evaluate import evaluate_format, latency_inputs, measure_latency
from lp_lightning.export.graph import save_model
from lp_lightning.export.int4 import export_int4
from lp_lightning.export.int8 import export_int8
from lp_lightning.export.onnx_fp32 import check_parity, to_onnx
from lp_lightning.export.report import FORMATS, add_ratios, check_thresholds, format_entry
from lp_lightning.io import write_json
from lp_lightning.models import datamodule_from_hparams, load_classifier

REPORT_NAME = "export_report.json"
# onnxruntime keeps DequantizeLinear nodes unfolded to preserve QDQ patterns; the INT4 model has no activation
# QDQ, so this lets it fold the int4 Conv weights once at load (fp32 Conv speed, the file stays int4).
SESSION_CONFIGS: dict[str, dict[str, str]] = {"int4": {"session.disable_quant_qdq": "1"}}


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how to measure it (defaults match ``conf/export.yaml``)."""

    formats: Sequence[str] = FORMATS
    thresholds: Mapping[str, float] = field(default_factory=lambda: {"int8": 0.98, "int4": 0.95})
    threads: int = 1
    latency_batch_sizes: Sequence[int] = (1, 64)
    warmup: int = 10
    iters: int = 50
    calib_batches: int = 8
    calib_batch_size: int = 64
    parity_atol: float = 1e-4
    int4_block_size: int = 32
    int4_accuracy_level: int = 4
    reduce_range: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ValueError(f"formats={list(self.formats)!r} is invalid; allowed: {list(FORMATS)} (non-empty)")
        for fmt in self.thresholds:
            if fmt not in FORMATS:
                raise ValueError(f"thresholds key {fmt!r} is unknown; allowed: {list(FORMATS)}")
        for name in ("threads", "warmup", "iters", "calib_batches", "calib_batch_size", "int4_block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "warmup" else 1):
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not self.latency_batch_sizes or any(int(b) < 1 for b in self.latency_batch_sizes):
            raise ValueError(f"latency_batch_sizes={list(self.latency_batch_sizes)!r} must be positive integers")


def check_writable(out_dir: str | os.PathLike[str]) -> Path:
    """Create ``out_dir`` if needed and prove a file can be written there (one-line error otherwise)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test."):
            pass
    except OSError as exc:
        raise ValueError(f"out_dir={str(out)!r} is not writable: {exc.strerror or exc}") from exc
    return out


def _splits(hparams: Mapping[str, Any], cfg: ExportConfig) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Test images/labels and seeded calibration batches from the training split."""
    dm = datamodule_from_hparams(dict(hparams))
    x_test, y_test = dm.dataset("test").tensors
    x_train = dm.dataset("train").tensors[0]
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(cfg.seed))
    n = min(len(x_train), cfg.calib_batches * cfg.calib_batch_size)
    calib = x_train[order[:n]].float().numpy()
    batches = [calib[i:i + cfg.calib_batch_size] for i in range(0, n, cfg.calib_batch_size)]
    return x_test.float().numpy(), y_test.numpy(), batches


def _plain_model(model: torch.nn.Module, ckpt: Mapping[str, Any]) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """The plain float model and learned qparams for FakeQuantPrecision checkpoints, else (model, None)."""
    if "FakeQuantPrecision" not in ckpt:
        return model, None
    from lp_lightning.quant import convert  # only needed for fake-quant checkpoints

    plain, qparams = convert(model)
    return plain.float().eval(), dict(qparams)


def run_export(ckpt_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], cfg: ExportConfig | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export ``ckpt_path`` to every format of ``cfg`` under ``out_dir`` and write the report.

    Returns the report; ``report["failures"]`` lists missed thresholds (the report is written anyway).
    Any error before the report is complete removes the model files this call wrote (and ``out_dir`` if
    this call created it), so a failed export leaves nothing behind.
    """
    cfg = cfg or ExportConfig()
    created = not Path(out_dir).exists()
    out = check_writable(out_dir)
    written: list[Path] = []
    try:
        log(f"[lp-export] loading {str(ckpt_path)!r} (weights_only)")
        model, ckpt = load_classifier(ckpt_path)
        plain, qparams = _plain_model(model, ckpt)
        x_test, y_test, calib = _splits(ckpt["hyper_parameters"], cfg)
        with torch.no_grad():
            ref = plain(torch.from_numpy(x_test)).float().numpy()
            others = {"fake_quant": model(torch.from_numpy(x_test)).float().numpy()} if qparams else {}
        log("[lp-export] fp32: torch.onnx.export (dynamic batch, weights inside the file)")
        proto = to_onnx(plain, torch.from_numpy(x_test[:2]))
        diff = check_parity(plain, proto, torch.from_numpy(x_test), cfg.parity_atol)
        log(f"[lp-export] fp32: parity max |dlogit| = {diff:.2e} (atol {cfg.parity_atol:g})")
        paths: dict[str, Path] = {}
        quant: dict[str, dict[str, Any]] = {"fp32": {"exporter": "torch.onnx dynamo", "parity_max_abs": diff}}
        if "fp32" in cfg.formats:
            paths["fp32"] = save_model(proto, out / "model_fp32.onnx")
            written.append(paths["fp32"])
        if "int8" in cfg.formats:
            source = "learned scales (TensorQuantOverrides)" if qparams else "minmax calibration"
            log(f"[lp-export] int8: static QDQ per-channel, uint8 act/int8 weights, {source} "
                f"on {sum(len(b) for b in calib)} training samples")
            quant["int8"] = export_int8(proto, out / "model_int8.onnx", calib, model=plain, qparams=qparams,
                                        reduce_range=cfg.reduce_range)
            paths["int8"] = out / "model_int8.onnx"
            written.append(paths["int8"])
            log(f"[lp-export] int8: calibration={quant['int8']['calibration']} "
                f"reduce_range={quant['int8']['reduce_range']}")
        if "int4" in cfg.formats:
            log(f"[lp-export] int4: Gemm->MatMul, MatMulNBits block {cfg.int4_block_size}, Conv int4 per-channel")
            quant["int4"] = export_int4(proto, out / "model_int4.onnx", cfg.int4_block_size, cfg.int4_accuracy_level,
                                        qparams=qparams)
            paths["int4"] = out / "model_int4.onnx"
            written.append(paths["int4"])
            log(f"[lp-export] int4: {quant['int4']['matmulnbits_nodes']} MatMulNBits, "
                f"{quant['int4']['conv_int4_weights']} int4 Conv weights")
        metrics = {}
        for fmt, path in paths.items():
            log(f"[lp-export] {fmt}: evaluating on {len(y_test)} test samples (onnxruntime CPU)")
            metrics[fmt] = evaluate_format(path, x_test, y_test, ref, cfg.threads, others, SESSION_CONFIGS.get(fmt))
        log(f"[lp-export] latency: batch {list(cfg.latency_batch_sizes)}, {cfg.threads} thread(s), "
            f"{cfg.warmup} warm-up + {cfg.iters} interleaved runs")
        lat = measure_latency(paths, latency_inputs(x_test, cfg.latency_batch_sizes), cfg.threads, cfg.warmup,
                              cfg.iters, SESSION_CONFIGS)
        for fmt, entries in SESSION_CONFIGS.items():
            if fmt in quant:
                quant[fmt]["session_config"] = dict(entries)
        formats = {f: format_entry(metrics[f], lat[f], cfg.latency_batch_sizes, cfg.threads, quant.get(f))
                   for f in paths}
        add_ratios(formats)
        report = {
            "formats": formats,
            "cpu": {**cpu_info(), "threads": cfg.threads},
            "checkpoint": str(ckpt_path),
            "model": ckpt["hyper_parameters"].get("net"),
            "pytorch_fp32_accuracy": float((ref.argmax(1) == y_test).mean()),
            "thresholds": dict(cfg.thresholds),
        }
        report["failures"] = check_thresholds(formats, cfg.thresholds)
        report["passed"] = not report["failures"]
        write_json(out / REPORT_NAME, report)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    log(f"[lp-export] report: {out / REPORT_NAME}")
    return report
