"""Table 3 in miniature: pure fp16 + Adam on digits, accuracy by eps, without and with EpsilonGuard(fix).

    python -m lp_lightning.tools.bench.table3 --seeds 0 1 2 --epochs 5 --out table3.json

Rows: fp16 for every eps (plain, and with ``EpsilonGuard(action="fix")``), an fp32 reference (eps=1e-8)
and bf16 with eps=1e-8 (the guard's verdict is recorded: it must be "ok"). Test accuracy in %, mean over
seeds (min-max in brackets). Runs are interleaved seed by seed, so machine load hits every row alike.
Training is deterministic on CPU, so configurations with the same effective eps and seed (every eps the
guard raises to the same safe value) are trained once and marked ``reused`` in the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lp_lightning.audit.epsilon import FLAGGED, eps_status, safe_eps
from lp_lightning.callbacks import EpsilonGuard
from lp_lightning.data import DigitsDataModule
from lp_lightning.io import write_json
from lp_lightning.models import Classifier
from lp_lightning.precision import PureHalfPrecision

EPS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)


def train_once(precision: str, eps: float, seed: int, epochs: int, guard: bool, lr: float,
               root: Path) -> dict[str, Any]:
    """Fit the default cnn on digits; return test accuracy, the guard's verdict and the eps used."""
    L.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(batch_size=64, seed=0)
    model = Classifier(net="cnn", input_shape=list(dm.input_shape), num_classes=dm.num_classes,
                       net_kwargs={"channels": [32, 64], "blocks_per_stage": 1},
                       optimizer={"name": "adam", "lr": lr, "eps": eps}, scheduler={"name": "cosine"},
                       data={"name": "digits", "batch_size": 64})
    # fp32_accumulate: 16-bit storage everywhere, matrix products accumulated in fp32 (as on GPUs); native
    # 16-bit CPU kernels give the same failure mode ~10-40x slower. update="nearest": the optimizer's arithmetic
    # in 16 bits, as in the paper (the default update="auto" steps in fp32, where eps=1e-8 is not lost)
    plugins = [] if precision == "float32" else [PureHalfPrecision(precision, compute="fp32_accumulate",
                                                                    update="nearest")]
    # the guard runs in every row (warn: it never changes anything) so its verdict is recorded
    eg = EpsilonGuard(action="fix" if guard else "warn", check_every_n_steps=0)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, plugins=plugins,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(root), callbacks=[eg], num_sanity_val_steps=0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
        test = trainer.test(model, datamodule=dm, verbose=False)[0]
    used = model.trainer.optimizers[0].param_groups[0]["eps"]
    return {"precision": precision, "eps": eps, "seed": seed, "guard": guard, "eps_used": used,
            "status": eg.checks[0].status if eg.checks else None, "test_acc": 100.0 * test["test/acc"],
            "seconds": time.perf_counter() - start}


def effective_eps(precision: str, eps: float, guard: bool) -> float:
    """The eps the optimizer steps with: EpsilonGuard(fix) raises a flagged eps to the safe value."""
    dtype = getattr(torch, precision)
    return safe_eps(dtype) if guard and eps_status(eps, dtype) in FLAGGED else eps


def rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean/min/max test accuracy per (precision, eps, guard)."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in runs:
        key = (r["precision"], r["eps"], r["guard"])
        row = out.setdefault(key, {"precision": r["precision"], "eps": r["eps"], "guard": r["guard"],
                                   "status": r["status"], "eps_used": r["eps_used"], "acc": []})
        row["acc"].append(r["test_acc"])
    for row in out.values():
        acc = row.pop("acc")
        row.update(acc_mean=statistics.fmean(acc), acc_min=min(acc), acc_max=max(acc), n=len(acc))
    return list(out.values())


def markdown(table: list[dict[str, Any]], eps_values: list[float]) -> str:
    """Rows = configuration, columns = eps; cells ``mean (min-max)``."""
    cell = {(r["precision"], r["guard"], r["eps"]): r for r in table}
    head = "| run | " + " | ".join(f"eps={e:g}" for e in eps_values) + " |"
    lines = [head, "|---" * (len(eps_values) + 1) + "|"]
    for label, prec, guard in (("fp16", "float16", False), ("fp16 + EpsilonGuard(fix)", "float16", True)):
        cells = []
        for e in eps_values:
            r = cell.get((prec, guard, e))
            cells.append("-" if r is None else f"{r['acc_mean']:.1f} ({r['acc_min']:.1f}-{r['acc_max']:.1f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, prec in (("fp32 reference", "float32"), ("bf16", "bfloat16")):
        for r in (r for r in table if r["precision"] == prec):  # value in the column of its eps
            cells = [f"{r['acc_mean']:.1f} ({r['acc_min']:.1f}-{r['acc_max']:.1f})" if e == r["eps"] else ""
                     for e in eps_values]
            lines.append(f"| {label} (guard: {r['status']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--eps", type=float, nargs="+", default=list(EPS))
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=None, help="write runs + table as JSON here")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (e.g. 1 per process)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="only combine the runs of earlier --out files (e.g. one process per seed)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        runs = [r for part in parts for r in part["runs"]]
        for r in runs:  # the guard's verdict on the eps asked for (older files copied it from the reused run)
            r["status"] = eps_status(r["eps"], getattr(torch, r["precision"]))
        args.seeds = sorted({r["seed"] for r in runs})
        args.epochs = parts[0]["epochs"]
        args.eps = sorted({r["eps"] for r in runs if r["precision"] == "float16"}, reverse=True)
        return _report(runs, args)
    runs: list[dict[str, Any]] = []
    done: dict[tuple, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # interleaved: every configuration once per seed
            configs = [("float16", e, g) for e in args.eps for g in (False, True)]
            configs += [("float32", 1e-8, False), ("bfloat16", 1e-8, False)]
            for precision, eps, guard in configs:
                key = (precision, effective_eps(precision, eps, guard), seed)
                if key in done:  # same effective eps and seed: the same deterministic run
                    run = {**done[key], "eps": eps, "guard": guard, "reused": True,
                           "status": eps_status(eps, getattr(torch, precision))}
                else:
                    run = train_once(precision, eps, seed, args.epochs, guard, args.lr, Path(tmp))
                    done[key] = run
                runs.append(run)
                print(f"{precision} eps={eps:g} guard={guard} seed={seed}: acc={run['test_acc']:.1f}% "
                      f"(eps used {run['eps_used']:.3g}, {run['status']}, {run['seconds']:.0f}s)", flush=True)
    return _report(runs, args)


def _report(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    table = rows(runs)
    text = markdown(table, list(args.eps))
    print(text)
    result = {"epochs": args.epochs, "seeds": args.seeds, "lr": args.lr, "runs": runs, "table": table,
              "markdown": text}
    if args.out is not None:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
