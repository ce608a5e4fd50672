"""The Lemma 1 observation in miniature: err and tol per precision, certified fraction and agreement.

    python -m lp_lightning.tools.bench.lemma1 --models cnn mlp --epochs 15 --out lemma1.json --plots docs/img

Each (model, precision) is trained with ``lp-train`` (``callbacks=audit``); the ToleranceAudit of the last
epoch compares the trained low-precision model with its own weights evaluated in fp32 on the validation
split. Paper (MNIST): mean err ~1e-3, mean tol ~1e-1; certified fraction is a lower bound on agreement and
``violations`` must be 0.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from lp_lightning.config import compose_config
from lp_lightning.io import write_json
from lp_lightning.train import run

PRECISIONS = ("fp16", "bf16", "fp16_mixed", "bf16_mixed", "fp8", "int8", "int4w")
KEYS = ("certified_fraction", "agreement", "violations", "err_mean", "err_p99", "err_max", "tol_mean",
        "tol_median", "nonfinite", "n_samples")


def audit_run(model: str, precision: str, epochs: int, seed: int, root: Path, plots: Path | None) -> dict[str, Any]:
    """Train one configuration with the audit on; return its last audit report plus test accuracy."""
    run_dir = root / f"{model}_{precision}"
    cfg = compose_config("train", [f"model={model}", f"precision={precision}", f"seed={seed}",
                                   f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false",
                                   "callbacks=audit", f"callbacks.audit.every_n_epochs={epochs}"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metrics = run(cfg, run_dir, precision)
    except (ValueError, RuntimeError) as exc:  # e.g. fp8 on a net with no eligible Linear layer
        return {"model": model, "precision": precision, "skipped": str(exc).split(",")[0]}
    report_path = max(run_dir.glob("logs/*/audit/epoch_*.json"))
    report = json.loads(report_path.read_text())
    row = {"model": model, "precision": precision, "test_acc": metrics["test_acc"],
           **{k: report[k] for k in KEYS}}
    if plots is not None and report_path.with_suffix(".png").is_file():
        plots.mkdir(parents=True, exist_ok=True)
        target = plots / f"lemma1_{model}_{precision}.png"
        shutil.copyfile(report_path.with_suffix(".png"), target)
        row["plot"] = str(target)
    return row


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """One line per (model, precision): err and tol statistics, certified fraction, agreement, violations."""
    lines = ["| model | precision | test acc | err mean | err p99 | err max | tol mean | tol median | "
             "certified | agreement | violations | non-finite |", "|" + "---|" * 12]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['precision']} | n/a: {r['skipped']} |" + " |" * 9)
            continue
        lines.append(f"| {r['model']} | {r['precision']} | {100 * r['test_acc']:.1f}% | {r['err_mean']:.1e} | "
                     f"{r['err_p99']:.1e} | {r['err_max']:.1e} | {r['tol_mean']:.2f} | {r['tol_median']:.2f} | "
                     f"{r['certified_fraction']:.3f} | {r['agreement']:.3f} | {r['violations']} | "
                     f"{r['nonfinite']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    parser.add_argument("--plots", type=Path, default=None, help="copy each run's tolerance-vs-error PNG here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [audit_run(m, p, args.epochs, args.seed, Path(tmp), args.plots)
                for m in args.models for p in args.precisions]
    result = {"epochs": args.epochs, "seed": args.seed, "rows": rows}
    print(to_markdown(rows))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
