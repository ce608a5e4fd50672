"""``lp-export``: a trained checkpoint to fp32 / INT8 / INT4 ONNX, evaluated on onnxruntime (CPU)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lp_lightning.config import config_dir
from lp_lightning.export import ExportConfig, ExportError, run_export
from lp_lightning.export.report import table
from lp_lightning.models import CheckpointError

FIELDS = ("formats", "thresholds", "threads", "latency_batch_sizes", "warmup", "iters", "calib_batches",
          "calib_batch_size", "parity_atol", "int4_block_size", "int4_accuracy_level", "reduce_range", "seed")


def export_config(cfg: DictConfig) -> ExportConfig:
    """The :class:`ExportConfig` of a composed ``conf/export.yaml`` (values validated there)."""
    values: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    kwargs = {k: values[k] for k in FIELDS if k in values}
    if isinstance(kwargs.get("formats"), str):
        kwargs["formats"] = [kwargs["formats"]]
    kwargs["thresholds"] = {k: float(v) for k, v in (kwargs.get("thresholds") or {}).items() if v is not None}
    return ExportConfig(**kwargs)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate the config, then export and evaluate; returns the report."""
    if not cfg.get("ckpt"):
        raise ValueError("ckpt=PATH is required (a checkpoint written by lp-train)")
    export_cfg = export_config(cfg)  # bad formats/values fail here, before anything is read or written
    ckpt = Path(str(cfg.ckpt))
    out_dir = Path(str(cfg.out_dir)) if cfg.get("out_dir") else ckpt.parent / "export"
    return run_export(ckpt, out_dir, export_cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def main(cfg: DictConfig) -> None:
    """Entry point of ``lp-export``: exit 0 on success, 1 when a threshold is missed, 2 on bad input."""
    try:
        report = run(cfg)
    except (CheckpointError, ExportError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"lp-export: error: {first}", file=sys.stderr)
        sys.exit(2)
    print(table(report))
    cpu = report["cpu"]
    print(f"cpu: {cpu['model_name']} vnni={cpu['vnni']} threads={cpu['threads']} onnxruntime={cpu['onnxruntime']}")
    for failure in report["failures"]:
        print(f"lp-export: threshold missed: {failure}", file=sys.stderr)
    if report["failures"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
