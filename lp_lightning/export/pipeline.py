"""Any LightningModule (or checkpoint) -> fp32/INT8/INT4 ONNX files -> onnxruntime evaluation -> ``export_report.json``.

Models are written and evaluated in a staging folder inside ``out_dir``; only when every step succeeded
are they moved into place and the report written, so a failed export leaves an earlier one untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import onnx
import torch

from lp_lightning.batches import BatchKeys, require_logits
from lp_lightning.data.rebuild import build_data
from lp_lightning.data.samples import collect, split_loader
from lp_lightning.export.config import ExportConfig
from lp_lightning.export.cpu import cpu_info
from lp_lightning.export.edge import check_edge, edge_checks
from lp_lightning.export.evaluate import evaluate_format, latency_inputs, measure_latency
from lp_lightning.export.graph import save_model
from lp_lightning.export.int4 import export_int4
from lp_lightning.export.int4_qdq import export_int4_qdq
from lp_lightning.export.int8 import export_int8
from lp_lightning.export.onnx_fp32 import check_parity, to_onnx
from lp_lightning.export.report import add_ratios, check_thresholds, format_entry
from lp_lightning.io import write_json
from lp_lightning.models.checkpoint import class_path, load_module, model_id

REPORT_NAME = "export_report.json"
STAGING_PREFIX = ".lp-export-"
# onnxruntime keeps DequantizeLinear nodes unfolded to preserve QDQ patterns; the INT4 model has no activation
# QDQ, so this lets it fold the int4 Conv weights once at load (fp32 Conv speed, the file stays int4).
SESSION_CONFIGS: dict[str, dict[str, str]] = {"int4": {"session.disable_quant_qdq": "1"},
                                              "int4_qdq": {"session.disable_quant_qdq": "1"}}

Log = Callable[[str], None]
Splits = tuple[np.ndarray, np.ndarray | None, list[np.ndarray]]


def model_name(fmt: str) -> str:
    """File name of a format's model inside ``out_dir``."""
    return f"model_{fmt}.onnx"


def _missing_dirs(path: Path) -> list[Path]:
    """The levels of ``path`` that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove ``dirs`` (deepest first) while they are empty; stop at the first that is not."""
    for path in dirs:
        try:
            path.rmdir()
        except OSError:
            return


@contextmanager
def staging_dir(out_dir: str | os.PathLike[str]) -> Iterator[tuple[Path, Path]]:
    """Create ``out_dir`` if needed and yield ``(out, staging)``, a fresh temp folder inside it.

    The staging folder is always removed at exit; on an error (any BaseException) so is every level of
    ``out_dir`` this call created, as long as it is empty. An unwritable ``out_dir`` is a one-line ValueError.
    """
    out = Path(out_dir)
    created = _missing_dirs(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out, prefix=STAGING_PREFIX))
    except OSError as exc:
        _remove_empty_dirs(created)
        raise ValueError(f"out_dir={str(out)!r} is not writable: {exc.strerror or exc}") from exc
    ok = False
    try:
        yield out, staging
        ok = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not ok:
            _remove_empty_dirs(created)


def _splits(datamodule: L.LightningDataModule, cfg: ExportConfig, keys: BatchKeys) -> Splits:
    """Test inputs/labels (labels None when the batches carry none) and calibration batches: the first
    ``calib_batches * calib_batch_size`` samples of the training dataloader (its shuffling seeded by ``cfg.seed``
    unless the loader has its own generator)."""
    x_test, y_test = collect(split_loader(datamodule, "test"), keys)
    with torch.random.fork_rng():  # a shuffling loader without its own generator draws from torch's global RNG
        torch.manual_seed(cfg.seed)
        x_train, _ = collect(split_loader(datamodule, "train"), keys, cfg.calib_batches * cfg.calib_batch_size)
    calib = x_train.float().numpy()
    batches = [calib[i:i + cfg.calib_batch_size] for i in range(0, len(calib), cfg.calib_batch_size)]
    return x_test.float().numpy(), None if y_test is None else y_test.numpy(), batches


def _plain_model(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """The plain float model and learned qparams of a fake-quant (QAT) module, else (model, None)."""
    from lp_lightning.quant import convert, fake_quant_layers

    if not fake_quant_layers(model):
        return model, None
    plain, qparams = convert(model, activations=False)  # ONNX: float graph + qparams -> QDQ
    return plain.float().eval(), dict(qparams)


def _write_models(plain: torch.nn.Module, proto: onnx.ModelProto, calib: list[np.ndarray],
                  qparams: dict[str, Any] | None, staging: Path, cfg: ExportConfig, log: Log
                  ) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """Write every format of ``cfg`` into ``staging``; returns their paths and quantization facts."""
    paths: dict[str, Path] = {}
    quant: dict[str, dict[str, Any]] = {}
    if "fp32" in cfg.formats:
        paths["fp32"] = save_model(proto, staging / model_name("fp32"))
    if "int8" in cfg.formats:
        source = "learned scales (TensorQuantOverrides)" if qparams else "minmax calibration"
        log(f"[lp-export] int8: static QDQ per-channel, uint8 act/int8 weights, {source} "
            f"on {sum(len(b) for b in calib)} training samples")
        paths["int8"] = staging / model_name("int8")
        quant["int8"] = export_int8(proto, paths["int8"], calib, model=plain, qparams=qparams,
                                    reduce_range=cfg.reduce_range)
        log(f"[lp-export] int8: calibration={quant['int8']['calibration']} "
            f"reduce_range={quant['int8']['reduce_range']}")
    if "int4" in cfg.formats or "int4_qdq" in cfg.formats:
        log(f"[lp-export] int4: Gemm->MatMul, MatMulNBits block {cfg.int4_block_size}, Conv int4 per-channel")
        int4_path = staging / model_name("int4")  # int4_qdq alone: built, rewritten, left in staging
        int4 = export_int4(proto, int4_path, cfg.int4_block_size, cfg.int4_accuracy_level, qparams=qparams)
        log(f"[lp-export] int4: {int4['matmulnbits_nodes']} MatMulNBits, {int4['conv_int4_weights']} int4 Conv weights")
        if "int4" in cfg.formats:
            paths["int4"], quant["int4"] = int4_path, int4
        if "int4_qdq" in cfg.formats:
            paths["int4_qdq"] = staging / model_name("int4_qdq")
            quant["int4_qdq"] = {**export_int4_qdq(int4_path, paths["int4_qdq"]),
                                 **{k: int4[k] for k in ("calibration", "block_size", "matmulnbits_nodes")}}
            log(f"[lp-export] int4_qdq: {quant['int4_qdq']['dq_matmul_nodes']} MatMulNBits -> "
                f"DequantizeLinear + MatMul (same int4 weights)")
    return paths, quant


def _measure(paths: Mapping[str, Path], out: Path, splits: Splits, ref: np.ndarray, others: dict[str, np.ndarray],
             cfg: ExportConfig, log: Log) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Evaluate and time the staged models; metrics name each model's final path under ``out``."""
    x_test, y_test, _ = splits
    metrics = {}
    for fmt, path in paths.items():
        log(f"[lp-export] {fmt}: evaluating on {len(x_test)} test samples (onnxruntime CPU)")
        metrics[fmt] = evaluate_format(path, x_test, y_test, ref, cfg.threads, others, SESSION_CONFIGS.get(fmt))
        metrics[fmt]["path"] = str(out / model_name(fmt))  # where it will be; same size after the rename
    log(f"[lp-export] latency: batch {list(cfg.latency_batch_sizes)}, {cfg.threads} thread(s), "
        f"{cfg.warmup} warm-up + {cfg.iters} interleaved runs")
    lat = measure_latency(paths, latency_inputs(x_test, cfg.latency_batch_sizes), cfg.threads, cfg.warmup,
                          cfg.iters, SESSION_CONFIGS)
    return metrics, lat


def _publish(paths: Mapping[str, Path], out: Path, report: Mapping[str, Any],
             extra: Mapping[str, Path] | None = None) -> Path:
    """Move the staged models (and the ``extra`` files: final name -> staged path) into ``out``, then write the
    report (atomically).

    A stale report is removed first, so a crash while moving never leaves a report naming other files.
    """
    (out / REPORT_NAME).unlink(missing_ok=True)
    for fmt, path in paths.items():
        os.replace(path, out / model_name(fmt))
    for name, path in (extra or {}).items():
        os.replace(path, out / name)
    return write_json(out / REPORT_NAME, report)


def export_module(module: L.LightningModule, datamodule: L.LightningDataModule, out_dir: str | os.PathLike[str],
                  cfg: ExportConfig | None = None, keys: BatchKeys | None = None, log: Log = print,
                  source: str | None = None) -> dict[str, Any]:
    """Export ``module`` (any LightningModule returning (N, C) logits; a fake-quant module exports with its
    learned scales) to every format of ``cfg`` under ``out_dir``, prove each on onnxruntime against the module
    on ``datamodule``'s test split, and write ``export_report.json``.

    ``keys`` says where the input (and the labels) are in the batches. Returns the report;
    ``report["failures"]`` lists missed thresholds (the report is written anyway). Everything is checked
    before ``out_dir`` is created. Models are built and evaluated in a staging folder and moved into
    ``out_dir`` only when every step succeeded: a failed export leaves the files of an earlier one untouched,
    and removes the folders this call created.
    """
    cfg = cfg or ExportConfig()
    module = module.float().eval()
    splits = _splits(datamodule, cfg, keys or BatchKeys())
    x_test, y_test, calib = splits
    with torch.no_grad():
        require_logits(module(torch.from_numpy(x_test[:2])), "lp-export", module)
    plain, qparams = _plain_model(module)
    with staging_dir(out_dir) as (out, staging):
        with torch.no_grad():
            ref = plain(torch.from_numpy(x_test)).float().numpy()
            others = {"fake_quant": module(torch.from_numpy(x_test)).float().numpy()} if qparams else {}
        log("[lp-export] fp32: torch.onnx.export (dynamic batch, weights inside the file)")
        proto = to_onnx(plain, torch.from_numpy(x_test[:2]))
        diff = check_parity(plain, proto, torch.from_numpy(x_test), cfg.parity_atol)
        log(f"[lp-export] fp32: parity max |dlogit| = {diff:.2e} (atol {cfg.parity_atol:g})")
        paths, quant = _write_models(plain, proto, calib, qparams, staging, cfg, log)
        quant["fp32"] = {"exporter": "torch.onnx dynamo", "parity_max_abs": diff}
        metrics, lat = _measure(paths, out, splits, ref, others, cfg, log)
        for fmt, entries in SESSION_CONFIGS.items():
            if fmt in quant:
                quant[fmt]["session_config"] = dict(entries)
        formats = {f: format_entry(metrics[f], lat[f], cfg.latency_batch_sizes, cfg.threads, quant.get(f))
                   for f in paths}
        add_ratios(formats)
        report: dict[str, Any] = {
            "formats": formats,
            "cpu": {**cpu_info(), "threads": cfg.threads},
            "checkpoint": source,
            "model": model_id(module),
            "data": class_path(type(datamodule)),
            "pytorch_fp32_accuracy": None if y_test is None else float((ref.argmax(1) == y_test).mean()),
            "thresholds": dict(cfg.thresholds),
        }
        report["failures"] = check_thresholds(formats, cfg.thresholds)
        edge_files: dict[str, Path] = {}
        if cfg.edge:
            report["edge"], edge_files = edge_checks(paths, staging, out, x_test, y_test, ref, others,
                                                     cfg.latency_batch_sizes, cfg.threads, SESSION_CONFIGS, log)
            report["failures"] += check_edge(report["edge"], cfg.thresholds, cfg.parity_atol)
        report["passed"] = not report["failures"]
        _publish(paths, out, report, edge_files)
    log(f"[lp-export] report: {out / REPORT_NAME}")
    return report


def run_export(ckpt_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], cfg: ExportConfig | None = None,
               log: Log = print, model_class: str | type[L.LightningModule] | None = None,
               data: Mapping[str, Any] | None = None, keys: BatchKeys | None = None) -> dict[str, Any]:
    """Export checkpoint ``ckpt_path`` (see :func:`export_module`).

    ``model_class``: the checkpoint's LightningModule class (or dotted path); None: lp-train's Classifier.
    ``data``: the DataModule as a Hydra-style node (``{"_target_": "pkg.MyDataModule", **arguments}``), built
    from the checkpoint's saved DataModule hyperparameters updated with ``arguments``; without ``_target_``
    the built-in datamodule an lp-train checkpoint records, updated with ``data``.
    """
    log(f"[lp-export] loading {str(ckpt_path)!r} (weights_only)")
    module, ckpt = load_module(ckpt_path, model_class)
    datamodule = build_data(ckpt, data, ckpt_path)
    return export_module(module, datamodule, out_dir, cfg, keys, log, source=str(ckpt_path))
