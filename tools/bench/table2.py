"""Table 2 of "Revisiting 16-bit Neural Network Training" in miniature: precision x model x seed on digits.

    python -m lp_lightning.tools.bench.table2 --seeds 0 1 2 3 4 --out table2.json

The same sweep as Hydra multirun: ``lp-train experiment=table2`` (``conf/experiment/table2.yaml``; the vit with
``model=vit optimizer=adamw optimizer.eps=1e-3``) writes the same ``<root>/<model>/<precision>/seed<s>`` layout under
``outputs/table2``, which ``--no-train`` then tabulates. A finished run is used only if its ``config.yaml`` has the
requested SETTINGS; otherwise the sweep stops and names it.

Every run goes through ``lp_lightning.train.run`` with the composed ``lp-train`` config
(``precision=<p> model=<m> optimizer=sgd seed=<s>``, SGD momentum 0.9 as in the paper; the vit keeps its AdamW
with ``eps=1e-3``, above the fp16-safe epsilon 2**-12 of EpsilonGuard: with SGD it needs ``--vit-clip 1.0``
and pure bf16 loses 4 points with round-to-nearest updates, see docs/pure16.md), writing
``<root>/<model>/<precision>/seed<s>/metrics.json``. Finished runs are read back,
not re-run, so an interrupted sweep resumes and ``--no-train`` only tabulates. Prints markdown tables
of test accuracy (mean +- std over seeds), the difference to fp32 in points, and time per epoch.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from lp_lightning.io import write_json

PRECISIONS = ["fp32", "fp16", "bf16", "fp16_mixed", "bf16_mixed"]
MODELS = ["mlp", "cnn", "vit"]


def overrides(model: str, precision: str, seed: int, epochs: int | None, vit_optimizer: str = "adamw",
              vit_lr: float = 3e-3, vit_eps: float = 1e-3, vit_clip: float | None = None) -> list[str]:
    """The ``lp-train`` overrides of one run (SGD momentum 0.9; the vit: ``vit_optimizer``)."""
    optimizer = vit_optimizer if model == "vit" else "sgd"
    out = [f"model={model}", f"precision={precision}", f"seed={seed}", f"optimizer={optimizer}",
           "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=50",
           "callbacks.epsilon_guard.action=warn"]  # measure the eps asked for (--vit-eps 1e-4 is below the bound)
    if model == "vit":
        out.append(f"optimizer.lr={vit_lr}")
        if vit_optimizer != "sgd":
            out.append(f"optimizer.eps={vit_eps}")
        if vit_clip is not None:
            out.append(f"+trainer.gradient_clip_val={vit_clip}")
    if epochs is not None:
        out.append(f"trainer.max_epochs={epochs}")
    return out


def run_one(run_dir: str, args: list[str], threads: int | None) -> dict[str, Any]:
    """Compose the config and train (in a worker process); return its metrics."""
    import torch

    from lp_lightning.config import compose_config
    from lp_lightning.train import run

    if threads:
        torch.set_num_threads(threads)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    cfg = compose_config("train", args)
    precision = next(a.split("=", 1)[1] for a in args if a.startswith("precision="))
    return run(cfg, run_dir, precision)


# what must match for a finished run to stand for a requested one (the rest: logging, progress bar, guard)
SETTINGS = ("model", "optimizer", "precision", "data", "seed", "trainer.max_epochs", "trainer.gradient_clip_val")


def settings_differ(run_dir: Path, args: list[str]) -> list[str]:
    """The SETTINGS in which the run in ``run_dir`` (its ``config.yaml``) differs from ``args``' config."""
    from omegaconf import OmegaConf

    from lp_lightning.config import compose_config

    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return ["config.yaml missing"]
    saved, wanted = OmegaConf.load(saved_file), compose_config("train", args)

    def value(cfg: Any, key: str) -> Any:
        node = OmegaConf.select(cfg, key, default=None)
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    return [f"{key} was {value(saved, key)!r}, asked {value(wanted, key)!r}" for key in SETTINGS
            if value(saved, key) != value(wanted, key)]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: dict[tuple[str, str], list[dict[str, Any]]], models: list[str],
              precisions: list[str]) -> dict[str, Any]:
    """Per model and precision: accuracy mean/std (%), time per epoch (s), differences to fp32."""
    table: dict[str, Any] = {}
    for model in models:
        row: dict[str, Any] = {}
        for precision in precisions:
            runs = results.get((model, precision), [])
            if not runs:
                continue
            acc_mean, acc_std = _mean_std([100 * r["test_acc"] for r in runs])
            time_mean, _ = _mean_std([r["time_per_epoch_s"] for r in runs])
            row[precision] = {"acc_mean": acc_mean, "acc_std": acc_std, "time_per_epoch_s": time_mean,
                              "n_seeds": len(runs), "epochs": runs[0]["epochs"]}
        if "fp32" in row:
            for cell in row.values():
                cell["acc_diff_vs_fp32"] = cell["acc_mean"] - row["fp32"]["acc_mean"]
                cell["speedup_vs_fp32"] = row["fp32"]["time_per_epoch_s"] / cell["time_per_epoch_s"]
        table[model] = row
    return table


def markdown(table: dict[str, Any], precisions: list[str]) -> str:
    """Three markdown tables: accuracy, difference to fp32, time per epoch (with fp32 time / time)."""
    head = "| model | " + " | ".join(precisions) + " |\n|---|" + "---:|" * len(precisions) + "\n"

    def rows(fmt: Any) -> str:
        return "".join(f"| {m} | " + " | ".join(fmt(row[p]) if p in row else "-" for p in precisions) + " |\n"
                       for m, row in table.items())

    return ("Test accuracy % (mean +- std over seeds)\n\n" + head
            + rows(lambda c: f"{c['acc_mean']:.1f} +- {c['acc_std']:.1f}")
            + "\nDifference to fp32 (accuracy points)\n\n" + head
            + rows(lambda c: f"{c.get('acc_diff_vs_fp32', float('nan')):+.1f}")
            + "\nTime per epoch in s (speedup fp32 time / time)\n\n" + head
            + rows(lambda c: f"{c['time_per_epoch_s']:.2f} ({c.get('speedup_vs_fp32', float('nan')):.2f}x)"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--precisions", nargs="+", default=PRECISIONS)
    parser.add_argument("--epochs", type=int, default=None, help="default: each model config's max_epochs")
    parser.add_argument("--vit-optimizer", default="adamw", choices=["adamw", "adam", "sgd"])
    parser.add_argument("--vit-lr", type=float, default=3e-3, help="learning rate of the vit")
    parser.add_argument("--vit-eps", type=float, default=1e-3, help="Adam epsilon of the vit (fp16-safe: >= 2**-12)")
    parser.add_argument("--vit-clip", type=float, default=None, help="gradient norm clipping of the vit (SGD: 1.0)")
    parser.add_argument("--root", type=Path, default=Path("outputs/table2"))
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (worker processes)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument("--no-train", action="store_true", help="only read finished runs")
    parser.add_argument("--out", type=Path, default=None, help="write the summary and every run as JSON")
    args = parser.parse_args(argv)

    plan = [(m, p, s) for m in args.models for p in args.precisions for s in args.seeds]
    vit = (args.vit_optimizer, args.vit_lr, args.vit_eps, args.vit_clip)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    todo, stale = [], []
    for m, p, s in plan:
        run_dir = args.root / m / p / f"seed{s}"
        metrics = run_dir / "metrics.json"
        if metrics.is_file():
            differ = settings_differ(run_dir, overrides(m, p, s, args.epochs, *vit))
            if differ:
                stale.append(f"{run_dir}: {'; '.join(differ)}")
            results.setdefault((m, p), []).append(json.loads(metrics.read_text()))
        elif not args.no_train:
            todo.append((m, p, s, run_dir))
    if stale:  # a finished run stands for the requested one only if it was trained with the same settings
        raise SystemExit(f"table2: {len(stale)} finished run(s) under {str(args.root)!r} were trained with other "
                         f"settings, e.g. {stale[0]}; use another --root (or remove them)")
    if args.no_train and not results:
        raise SystemExit(f"table2: no finished run under {str(args.root)!r} for models {args.models}, precisions "
                         f"{args.precisions}, seeds {args.seeds}: nothing to tabulate (train them without --no-train)")
    if todo:
        print(f"{len(plan) - len(todo)} finished runs read, {len(todo)} to train", flush=True)
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_one, str(d), overrides(m, p, s, args.epochs, *vit), args.threads): (m, p, s)
                       for m, p, s, d in todo}
            for future, (m, p, s) in futures.items():
                metrics = future.result()
                results.setdefault((m, p), []).append(metrics)
                print(f"{m} {p} seed{s}: test_acc={metrics['test_acc']:.4f} "
                      f"time_per_epoch={metrics['time_per_epoch_s']:.2f}s", flush=True)
    table = summarize(results, args.models, args.precisions)
    print(markdown(table, args.precisions))
    if args.out:
        write_json(args.out, {"table": table, "seeds": args.seeds, "epochs": args.epochs,
                              "vit": {"optimizer": args.vit_optimizer, "lr": args.vit_lr, "eps": args.vit_eps,
                                      "clip": args.vit_clip},
                              "runs": [r for runs in results.values() for r in runs]})
    return table


if __name__ == "__main__":
    main()
