"""``lp-export``: a trained checkpoint to fp32 / INT8 / INT4 ONNX, evaluated on onnxruntime (CPU)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lp_lightning.cli import bad_config_exits_2, one_line
from lp_lightning.config import config_dir
from lp_lightning.export import ExportConfig, ExportError, run_export
from lp_lightning.export.mobile import summary_line
from lp_lightning.export.pipeline import REPORT_NAME
from lp_lightning.export.report import table
from lp_lightning.logs import quiet_console
from lp_lightning.models import CheckpointError
from lp_lightning.tools.checkpoint_args import model_and_data

FIELDS = ("formats", "thresholds", "threads", "latency_batch_sizes", "warmup", "iters", "calib_batches",
          "calib_batch_size", "parity_atol", "int4_block_size", "int4_accuracy_level", "reduce_range", "seed",
          "edge")


def export_config(cfg: DictConfig) -> ExportConfig:
    """The :class:`ExportConfig` of a composed ``conf/export.yaml`` (values validated there).

    Command-line shorthands: ``formats=int8`` means ``[int8]``, ``latency_batch_sizes=1`` means ``[1]``, and
    ``thresholds.<fmt>=null`` drops that format's threshold.
    """
    values: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    kwargs = {k: values[k] for k in FIELDS if k in values}
    if isinstance(kwargs.get("formats"), str):
        kwargs["formats"] = [kwargs["formats"]]
    sizes = kwargs.get("latency_batch_sizes")
    if isinstance(sizes, int) and not isinstance(sizes, bool):
        kwargs["latency_batch_sizes"] = [sizes]
    thresholds = kwargs.get("thresholds")
    if thresholds is None or isinstance(thresholds, dict):
        kwargs["thresholds"] = {k: v for k, v in (thresholds or {}).items() if v is not None}
    return ExportConfig(**kwargs)


def run(cfg: DictConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Validate the config, then export and evaluate; returns the report."""
    if not cfg.get("ckpt"):
        raise ValueError("ckpt=PATH is required (a Lightning checkpoint; model_class=pkg.mod.MyModule for your own)")
    export_cfg = export_config(cfg)  # bad formats/values fail here, before anything is read or written
    keys, model_class, data = model_and_data(cfg)
    ckpt = Path(str(cfg.ckpt))
    out_dir = Path(str(cfg.out_dir)) if cfg.get("out_dir") else ckpt.parent / "export"
    return run_export(ckpt, out_dir, export_cfg, log=log, model_class=model_class, data=data, keys=keys)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def _app(cfg: DictConfig) -> None:
    """Entry point of ``lp-export``: exit 0 on success, 1 when a threshold is missed, 2 on bad input."""
    try:
        verbose = bool(cfg.get("verbose", False))  # the steps' progress lines
        with quiet_console(verbose):
            report = run(cfg, log=print if verbose else lambda _: None)
    except (CheckpointError, ExportError, ValueError, TypeError, OSError) as exc:
        print(f"lp-export: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    print(table(report))
    for fmt, entry in report.get("edge", {}).items():  # edge=true: one line per format (docs/edge.md)
        print(summary_line(fmt, entry).removeprefix("[lp-export] "))
    cpu = report["cpu"]
    print(f"cpu: {cpu['model_name']} vnni={cpu['vnni']} threads={cpu['threads']} onnxruntime={cpu['onnxruntime']}")
    results = ", ".join(f"{fmt} acc={'n/a' if e['accuracy'] is None else format(e['accuracy'], '.4f')} agreement="
                        f"{e['agreement']:.4f}" for fmt, e in report["formats"].items())
    print(f"lp-export: {results} -> {Path(next(iter(report['formats'].values()))['path']).parent / REPORT_NAME}")
    for failure in report["failures"]:
        print(f"lp-export: threshold missed: {failure}", file=sys.stderr)
    if report["failures"]:
        sys.exit(1)


main = bad_config_exits_2(_app, open_data=True)

if __name__ == "__main__":
    main()
