"""Pure 16-bit against fp32 over seeds: round-to-nearest updates vs the defaults (stochastic rounding, fp32 norm
statistics), for SGD and AdamW, on the built-in mlp, cnn (BatchNorm), vit and a ResNet-with-BatchNorm test model.

    python -m lp_lightning.tools.bench.pure16 --models mlp cnn resnet --seeds 0 1 2 --threads 1 --out pure16.json

Every run goes through ``lp_lightning.train.run`` (the composed ``lp-train`` config) into
``<root>/<model>/<optimizer>/<variant>/seed<s>``; finished runs are read back, so an interrupted sweep resumes.
Variants: fp32; pure fp16 and bf16 with ``update=nearest norm_stats=16bit`` (Lightning's 16-true/bf16-true
behaviour) and with the defaults. SGD: lr 0.05, momentum 0.9 (the vit: gradient clipping 1.0); AdamW: eps 1e-3
(fp16-safe; the vit lr 3e-3). ``resnet`` is ``tests.user_pkg.models.TinyResNet`` on its own DataModule
(the repository's tests package must be importable). Prints accuracy (mean, worst seed, difference to fp32).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from lp_lightning.tools.bench.sweep_runs import add_sweep_arguments, cell, run_accuracy, run_sweep

VARIANTS = {
    "fp32": ["precision=fp32"],
    "fp16 nearest": ["precision=fp16", "precision.update=nearest", "precision.norm_stats=16bit"],
    "fp16 default": ["precision=fp16"],
    "bf16 nearest": ["precision=bf16", "precision.update=nearest", "precision.norm_stats=16bit"],
    "bf16 default": ["precision=bf16"],
    # not in the default sweep: what else might close a gap
    "fp16 kahan": ["precision=fp16", "precision.update=kahan"],
    "fp16 dynamic scale": ["precision=fp16", "precision.loss_scale=dynamic"],
}
DEFAULT_VARIANTS = ["fp32", "fp16 nearest", "fp16 default", "bf16 nearest", "bf16 default"]
RESNET = ["~model", "+model._target_=tests.user_pkg.models.TinyResNet", "~data",
          "+data._target_=tests.user_pkg.data.DigitsRows", "+data.layout=triple", "monitor=val_acc"]


def model_overrides(model: str, optimizer: str) -> list[str]:
    """The lp-train overrides of a model and optimizer (see the module docstring)."""
    if model == "resnet":
        return [*RESNET, f"+model.optimizer={optimizer}",
                *(["+model.learning_rate=0.003"] if optimizer == "adamw" else [])]
    out = [f"model={model}", f"optimizer={optimizer}"]
    if optimizer == "adamw":
        out += ["optimizer.eps=1e-3", *(["optimizer.lr=3e-3"] if model == "vit" else [])]
    elif model == "vit":
        out += ["optimizer.lr=0.05", "+trainer.gradient_clip_val=1.0", "trainer.max_epochs=25"]
    if model == "vit" and optimizer == "adamw":
        out.append("trainer.max_epochs=25")
    return out


def sweep(models: list[str], optimizers: list[str], variants: list[str], seeds: list[int], root: Path,
          epochs: int | None = None) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{model: {optimizer: {variant: [accuracy per seed]}}}`` (``epochs``: override every run's epochs)."""
    ep = [f"trainer.max_epochs={epochs}"] if epochs else []
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for model in models:
        for opt in optimizers:
            for variant in variants:
                for seed in seeds:
                    where = root / model / opt / variant.replace(" ", "_") / f"seed{seed}"
                    acc = run_accuracy(where, [*model_overrides(model, opt), *VARIANTS[variant], f"seed={seed}", *ep],
                                   variant.split()[0])
                    out.setdefault(model, {}).setdefault(opt, {}).setdefault(variant, []).append(acc)
    return out


def table(results: dict[str, dict[str, dict[str, list[float]]]]) -> str:
    """Markdown: one row per model and optimizer, ``mean (diff to fp32), worst`` per variant."""
    variants = list(next(iter(next(iter(results.values())).values())))
    lines = ["| model | optimizer | " + " | ".join(variants) + " |", "|---|---|" + "---:|" * len(variants)]
    for model, per_opt in results.items():
        for opt, acc in per_opt.items():
            ref = statistics.mean(acc["fp32"]) if "fp32" in acc else None
            cells = [cell(acc[v], None if v == "fp32" else ref) for v in variants]
            lines.append(f"| {model} | {opt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or read back) the sweep; returns ``{"accuracy", "markdown", "seeds", "threads"}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "vit", "resnet"],
                        choices=["mlp", "cnn", "vit", "resnet"])
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adamw"], choices=["sgd", "adamw"])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=None, help="override every run's epochs (quick checks)")
    add_sweep_arguments(parser, "outputs/pure16")
    args = parser.parse_args(argv)
    return run_sweep(args, lambda: sweep(args.models, args.optimizers, args.variants, args.seeds, args.root,
                                         args.epochs), table)


if __name__ == "__main__":
    main()
