"""QAT fine-tuning vs QAT from scratch: test accuracy over seeds (mean and worst), one run at a time.

    python -m lp_lightning.tools.bench.qat_finetune --models cnn --seeds 0 1 2 --threads 1 --out finetune.json

Per model and seed, through ``lp_lightning.train.run`` (the composed ``lp-train`` config, SGD momentum 0.9):
fp32 for the model's default epochs; int8 and int4w QAT from scratch for the same epochs; int8 and int4w QAT
fine-tuned from that fp32 run's best.ckpt (``init_from=``, ``finetune`` defaults: 0.1x the lr, 4 epochs).
Prints a markdown table of test accuracy (mean, worst seed) and the difference to fp32 in points.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from lp_lightning.tools.bench.sweep_runs import add_sweep_arguments, cell, run_accuracy, run_sweep

ROWS = ("fp32", "int8 scratch", "int8 finetune", "int4w scratch", "int4w finetune")


def sweep(model: str, seeds: list[int], root: Path, epochs: int | None) -> dict[str, list[float]]:
    """Accuracy per row and seed for one model."""
    acc: dict[str, list[float]] = {r: [] for r in ROWS}
    ep = [f"trainer.max_epochs={epochs}"] if epochs else []
    for seed in seeds:
        base = [f"model={model}", "optimizer=sgd", f"seed={seed}", *ep]
        fp32_dir = root / model / "fp32" / f"seed{seed}"
        acc["fp32"].append(run_accuracy(fp32_dir, [*base, "precision=fp32"], "fp32"))
        best = fp32_dir / "checkpoints" / "best.ckpt"
        for precision in ("int8", "int4w"):
            acc[f"{precision} scratch"].append(run_accuracy(root / model / precision / f"seed{seed}",
                                                    [*base, f"precision={precision}"], precision))
            acc[f"{precision} finetune"].append(run_accuracy(root / model / f"{precision}_finetune" / f"seed{seed}",
                                                     [*base, f"precision={precision}", f"init_from={best}"],
                                                     precision))
    return acc


def table(results: dict[str, dict[str, list[float]]]) -> str:
    lines = ["| model | " + " | ".join(ROWS) + " |", "|---|" + "---:|" * len(ROWS)]
    for model, acc in results.items():
        ref = statistics.mean(acc["fp32"])
        cells = [cell(acc[row], None if row == "fp32" else ref) for row in ROWS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn"], choices=["mlp", "cnn", "vit"])
    parser.add_argument("--epochs", type=int, default=None, help="fp32 and from-scratch epochs (default: lp-train's)")
    add_sweep_arguments(parser, "outputs/qat_finetune")
    args = parser.parse_args(argv)
    return run_sweep(args, lambda: {m: sweep(m, args.seeds, args.root, args.epochs) for m in args.models}, table)


if __name__ == "__main__":
    main()
