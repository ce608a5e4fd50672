"""``lp-audit``: tolerance audit (Lemma 1) of one checkpoint in two precisions, or of two checkpoints.

    lp-audit ckpt=A precision=fp16          A run through the fp16 plugin vs A in float32
    lp-audit ckpt=A reference=B             A (as stored, or in precision=...) vs the model B in float32

Writes ``audit_report.json`` and ``audit_plot.png`` (run dir or ``out_dir``) and prints a short table.
Bad input (missing/corrupt checkpoint, different class counts) exits 2 with one line naming the file.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.plugins.precision import Precision
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lp_lightning.audit.tolerance import Comparison, compare, summary
from lp_lightning.callbacks.audit_support import parse_reference, reference_copy
from lp_lightning.cli import bad_config_exits_2, one_line
from lp_lightning.config import config_dir, precision_kwargs
from lp_lightning.data.rebuild import datamodule_from_hparams
from lp_lightning.io import write_json
from lp_lightning.logs import quiet_loggers
from lp_lightning.models import CheckpointError, load_classifier
from lp_lightning.models.checkpoint import structural_config

REPORT_NAME, PLOT_NAME = "audit_report.json", "audit_plot.png"
SPLITS = ("train", "val", "test")


def precision_plugin(precision_cfg: Mapping[str, Any] | None) -> Precision:
    """The plugin of a ``conf/precision`` entry (Lightning's string or ``_target_``), as a Trainer builds it."""
    fp32 = {"_target_": "lp_lightning.config.lightning_precision", "precision": "32-true"}
    kwargs, plugins = precision_kwargs(precision_cfg or fp32)
    with quiet_loggers("lightning.pytorch"):
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, plugins=plugins, **kwargs)
    return trainer.precision_plugin


@torch.no_grad()
def logits(model: nn.Module, loader: DataLoader, plugin: Precision | None = None,
           dtype: torch.dtype | None = None, max_samples: int | None = None) -> tuple[Tensor, Tensor]:
    """``(logits, labels)`` over ``loader``: through ``plugin`` (forward_context, convert_input) or in ``dtype``."""
    outs, labels, n = [], [], 0
    for x, y in loader:
        if max_samples is not None:
            x, y = x[: max_samples - n], y[: max_samples - n]
        if plugin is not None:
            with plugin.forward_context():
                out = model(plugin.convert_input(x))
        else:
            out = model(x.to(dtype) if dtype is not None else x)
        if not isinstance(out, Tensor) or out.ndim != 2:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the model must return (N, C) logits, got {shape}")
        outs.append(out.detach().to(torch.float64))
        labels.append(y)
        n += len(x)
        if max_samples is not None and n >= max_samples:
            break
    return torch.cat(outs), torch.cat(labels)


def _accuracy(z: Tensor, y: Tensor) -> float:
    pred = (z[:, 0] > 0).long() if z.shape[1] == 1 else z.argmax(1)
    return float((pred == y).double().mean())


def _as_stored(ckpt: Mapping[str, Any]) -> str:
    """How a checkpoint runs without ``precision=``: fp32, or fake-quantized when it was trained that way."""
    config = structural_config(ckpt, "FakeQuantPrecision")
    if config is not None:
        return f"as stored (fake-quant weight={config.get('weight')} activation={config.get('activation')})"
    return "as stored (fp32)"


def audit_checkpoints(ckpt: str | os.PathLike[str], reference: str | os.PathLike[str] | None = None,
                      precision_cfg: Mapping[str, Any] | None = None, precision_name: str | None = None,
                      reference_dtype: str = "float32", split: str = "test", batch_size: int = 256,
                      max_samples: int | None = None) -> tuple[dict[str, Any], Comparison]:
    """Audit ``ckpt`` run in ``precision_cfg`` against ``reference`` (or itself) in ``reference_dtype``."""
    ref_dtype = parse_reference(reference_dtype)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed; use one of {list(SPLITS)}")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples={max_samples!r} must be null or an integer >= 1")
    if reference is None and precision_cfg is None:
        raise ValueError("ckpt=A alone needs precision=<name> (e.g. precision=fp16), or reference=B")
    model, raw = load_classifier(ckpt)
    hp = raw["hyper_parameters"]
    plugin = precision_plugin(precision_cfg)
    if reference is not None:
        ref_model, ref_raw = load_classifier(reference)
        ref_hp = ref_raw["hyper_parameters"]
        for key in ("num_classes", "input_shape"):
            if ref_hp.get(key) != hp.get(key):
                raise CheckpointError(f"reference {str(reference)!r} has {key}={ref_hp.get(key)!r} but ckpt "
                                      f"{str(ckpt)!r} has {key}={hp.get(key)!r}: the models are not comparable")
        ref_model = ref_model.to(ref_dtype).eval()
    else:
        ref_model = reference_copy(model, plugin, ref_dtype)
    low_model = plugin.convert_module(copy.deepcopy(model)).eval()
    dm = datamodule_from_hparams(hp, ckpt, batch_size=batch_size)
    loader = DataLoader(dm.dataset(split), batch_size=batch_size, shuffle=False)
    low, labels = logits(low_model, loader, plugin=plugin, max_samples=max_samples)
    ref, _ = logits(ref_model, loader, dtype=ref_dtype, max_samples=max_samples)
    comparison = compare(low, ref)
    if precision_cfg is None and precision_name is None:
        precision_name = _as_stored(raw)
    report = {**summary(comparison),
              "low_precision": precision_name or getattr(plugin, "precision", type(plugin).__name__),
              "reference_precision": str(ref_dtype).removeprefix("torch."),
              "mode": "models" if reference is not None else "precisions",
              "ckpt": str(ckpt), "reference_ckpt": str(reference) if reference is not None else None,
              "model": hp.get("net"), "data": (hp.get("data") or {}).get("name", "digits"), "split": split,
              "accuracy_low": _accuracy(low, labels), "accuracy_reference": _accuracy(ref, labels)}
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
            ("accuracy low / ref", f"{report['accuracy_low']:.4f} / {report['accuracy_reference']:.4f}")]
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
        raise ValueError("ckpt=PATH is required (a checkpoint written by lp-train)")
    precision_cfg = OmegaConf.to_container(cfg.precision, resolve=True) if cfg.get("precision") else None
    report, comparison = audit_checkpoints(
        str(cfg.ckpt), reference=str(cfg.reference) if cfg.get("reference") else None,
        precision_cfg=precision_cfg, precision_name=precision_name if precision_cfg else None,  # None: as stored
        reference_dtype=str(cfg.get("reference_dtype", "float32")), split=str(cfg.get("split", "test")),
        batch_size=_positive_int(cfg, "batch_size", 256), max_samples=cfg.get("max_samples"))
    write_outputs(report, comparison, cfg.get("out_dir") or out_dir, plot=bool(cfg.get("plot", True)))
    return report


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="audit")
def _app(cfg: DictConfig) -> None:
    """Entry point of ``lp-audit``: exit 0 (no violations), 1 (violations found), 2 (bad input)."""
    hydra_cfg = HydraConfig.get()
    try:
        report = run(cfg, hydra_cfg.runtime.output_dir, hydra_cfg.runtime.choices.get("precision"))
    except (CheckpointError, ValueError, TypeError, OSError) as exc:
        print(f"lp-audit: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    print(table(report))
    out = Path(cfg.get("out_dir") or hydra_cfg.runtime.output_dir)
    print(f"-> {out / REPORT_NAME}")
    if report["violations"]:
        print(f"lp-audit: {report['violations']} certified samples changed their top-1: the audit is wrong",
              file=sys.stderr)
        sys.exit(1)


main = bad_config_exits_2(_app)

if __name__ == "__main__":
    main()
