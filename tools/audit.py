"""``lp-audit``: tolerance audit (Lemma 1) of one checkpoint in two precisions, or of two checkpoints.

    lp-audit ckpt=A precision=fp16          A run through the fp16 plugin vs A in float32
    lp-audit ckpt=A reference=B             A (as stored, or in precision=...) vs the model B in float32

Writes ``audit_report.json`` and ``audit_plot.png`` (run dir or ``out_dir``) and prints a short table.
Bad input (missing/corrupt checkpoint, different class counts) exits 2 with one line naming the file.
A user's own module: ``model_class=pkg.mod.MyModule data._target_=pkg.mod.MyDataModule`` (as lp-export).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lp_lightning.audit.tolerance import Comparison
from lp_lightning.audit_models import audit_modules, check_max_samples
from lp_lightning.batches import BatchKeys
from lp_lightning.callbacks.audit_support import parse_reference
from lp_lightning.cli import bad_config_exits_2, one_line
from lp_lightning.config import config_dir
from lp_lightning.data.rebuild import build_data
from lp_lightning.data.samples import split_loader
from lp_lightning.io import write_json
from lp_lightning.logs import quiet_console
from lp_lightning.models import CheckpointError, load_module
from lp_lightning.models.checkpoint import structural_config
from lp_lightning.tools.checkpoint_args import model_and_data

REPORT_NAME, PLOT_NAME = "audit_report.json", "audit_plot.png"
SPLITS = ("train", "val", "test")


def _as_stored(ckpt: Mapping[str, Any]) -> str:
    """How a checkpoint runs without ``precision=``: fp32, or fake-quantized when it was trained that way."""
    config = structural_config(ckpt, "FakeQuantPrecision")
    if config is not None:
        return f"as stored (fake-quant weight={config.get('weight')} activation={config.get('activation')})"
    return "as stored (fp32)"


def audit_checkpoints(ckpt: str | os.PathLike[str], reference: str | os.PathLike[str] | None = None,
                      precision_cfg: Mapping[str, Any] | None = None, precision_name: str | None = None,
                      reference_dtype: str = "float32", split: str = "test", batch_size: int = 256,
                      max_samples: int | None = None, model_class: str | None = None,
                      data: Mapping[str, Any] | None = None, keys: BatchKeys | None = None
                      ) -> tuple[dict[str, Any], Comparison]:
    """Audit checkpoint ``ckpt`` run in ``precision_cfg`` against ``reference`` (or itself) in ``reference_dtype``
    on ``split`` of its DataModule (see :func:`lp_lightning.audit_models.audit_modules`).

    ``model_class`` (both checkpoints' LightningModule; None: lp-train's Classifier) and ``data`` (a Hydra-style
    DataModule node; None: the one an lp-train checkpoint records) as in :func:`lp_lightning.export.run_export`.
    """
    parse_reference(reference_dtype)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed; use one of {list(SPLITS)}")
    check_max_samples(max_samples)  # before loading anything
    if reference is None and precision_cfg is None:
        raise ValueError("ckpt=A alone needs precision=<name> (e.g. precision=fp16), or reference=B")
    model, raw = load_module(ckpt, model_class)
    ref_model = load_module(reference, model_class)[0] if reference is not None else None
    if not (data or {}).get("_target_") and "batch_size" not in (data or {}):
        data = {**(data or {}), "batch_size": batch_size}  # the built-in datamodule's loader batch
    loader = split_loader(build_data(raw, data, ckpt), split)
    try:
        report, comparison = audit_modules(model, loader, reference=ref_model, precision=precision_cfg,
                                           reference_dtype=reference_dtype, keys=keys, max_samples=max_samples,
                                           batch_size=batch_size)
    except ValueError as exc:
        if "not comparable" in str(exc):  # name the files, not only the classes
            raise CheckpointError(f"reference {str(reference)!r} vs ckpt {str(ckpt)!r}: {exc}") from exc
        raise
    if precision_cfg is None:
        report["low_precision"] = _as_stored(raw)
    elif precision_name is not None:
        report["low_precision"] = precision_name
    hp = raw.get("hyper_parameters") or {}
    builtin = model_class is None
    report.update({
        "ckpt": str(ckpt), "reference_ckpt": str(reference) if reference is not None else None,
        "model": hp.get("net") if builtin else model_class,
        "data": (hp.get("data") or {}).get("name", "digits") if builtin and not (data or {}).get("_target_")
        else (data or {}).get("_target_"),
        "split": split})
    return report, comparison


def write_outputs(report: dict[str, Any], comparison: Comparison, out_dir: str | os.PathLike[str],
                  plot: bool = True) -> Path:
    """Write the plot (first) and then ``audit_report.json``; both atomic. Returns the report path."""
    out = Path(out_dir)
    if plot:
        from lp_lightning.audit.plot import plot_comparison

        title = (f"{report['model']} on {report['data']} {report['split']}: {report['low_precision']} vs "
                 f"{report['reference_precision']}" + (" (two models)" if report["mode"] == "models" else ""))
        plot_comparison(comparison, out / PLOT_NAME, title=title)
    return write_json(out / REPORT_NAME, report)


def table(report: dict[str, Any]) -> str:
    """A short two-column text table of the report."""
    rows = [("samples", f"{report['n_samples']}"),
            ("certified_fraction", f"{report['certified_fraction']:.4f}"),
            ("agreement", f"{report['agreement']:.4f}"),
            ("violations", f"{report['violations']}"),
            ("nonfinite", f"{report['nonfinite']}"),
            ("err mean / p99 / max", f"{report['err_mean']:.2e} / {report['err_p99']:.2e} / {report['err_max']:.2e}"),
            ("tol mean / median", f"{report['tol_mean']:.3f} / {report['tol_median']:.3f}"),
            ("accuracy low / ref", " / ".join("n/a (no labels)" if a is None else f"{a:.4f}"
                                              for a in (report["accuracy_low"], report["accuracy_reference"])))]
    head = f"{report['low_precision']} vs {report['reference_precision']} ({report['mode']}, {report['split']})"
    return "\n".join([head, *(f"  {k:<22}{v}" for k, v in rows)])


def _positive_int(cfg: DictConfig, key: str, default: int) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} must be an integer >= 1")
    return value


def run(cfg: DictConfig, out_dir: str | os.PathLike[str], precision_name: str | None = None) -> dict[str, Any]:
    """Audit as configured by a composed ``conf/audit.yaml``; write the outputs; return the report."""
    if not cfg.get("ckpt"):
        raise ValueError("ckpt=PATH is required (a Lightning checkpoint; model_class=pkg.mod.MyModule for your own)")
    precision_cfg = OmegaConf.to_container(cfg.precision, resolve=True) if cfg.get("precision") else None
    keys, model_class, data = model_and_data(cfg)
    report, comparison = audit_checkpoints(
        str(cfg.ckpt), reference=str(cfg.reference) if cfg.get("reference") else None,
        precision_cfg=precision_cfg, precision_name=precision_name if precision_cfg else None,  # None: as stored
        reference_dtype=str(cfg.get("reference_dtype", "float32")), split=str(cfg.get("split", "test")),
        batch_size=_positive_int(cfg, "batch_size", 256), max_samples=cfg.get("max_samples"),
        model_class=model_class, data=data, keys=keys)
    write_outputs(report, comparison, cfg.get("out_dir") or out_dir, plot=bool(cfg.get("plot", True)))
    return report


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="audit")
def _app(cfg: DictConfig) -> None:
    """Entry point of ``lp-audit``: exit 0 (no violations), 1 (violations found), 2 (bad input)."""
    hydra_cfg = HydraConfig.get()
    try:
        with quiet_console(bool(cfg.get("verbose", False))):
            report = run(cfg, hydra_cfg.runtime.output_dir, hydra_cfg.runtime.choices.get("precision"))
    except (CheckpointError, ValueError, TypeError, OSError) as exc:
        print(f"lp-audit: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    print(table(report))
    out = Path(cfg.get("out_dir") or hydra_cfg.runtime.output_dir)
    print(f"lp-audit: {report['low_precision']} vs {report['reference_precision']}: certified_fraction="
          f"{report['certified_fraction']:.4f} agreement={report['agreement']:.4f} violations={report['violations']}"
          f" -> {out / REPORT_NAME}")
    if report["violations"]:
        print(f"lp-audit: {report['violations']} certified samples changed their top-1: the audit is wrong",
              file=sys.stderr)
        sys.exit(1)


main = bad_config_exits_2(_app, open_data=True)

if __name__ == "__main__":
    main()
