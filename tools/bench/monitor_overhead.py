"""Wall-time overhead of NumericsMonitor(every_n_steps=50) on the default ``lp-train`` run.

    python -m lp_lightning.tools.bench.monitor_overhead --repeats 3 [--epochs 15] [--out overhead.json]

Runs the default configuration (cnn on digits, fp32) with and without the monitor, interleaved
(plain, monitored, plain, monitored, ...) in one process, and prints the median of the per-pair
ratios monitored / plain. Target: <= 1.15.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir

from lp_lightning.config import config_dir
from lp_lightning.io import write_json
from lp_lightning.train import run


def _time_run(overrides: list[str], run_dir: Path) -> tuple[float, float]:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = run(cfg, run_dir, "fp32")
    return time.perf_counter() - start, metrics["test_acc"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="trainer.max_epochs (default: the config's)")
    parser.add_argument("--every-n-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    base = ["trainer.enable_progress_bar=false"]
    if args.epochs is not None:
        base.append(f"trainer.max_epochs={args.epochs}")
    variants = {
        "plain": base,
        "monitored": [*base, "callbacks=safety", "callbacks.epsilon_guard=null",
                      f"callbacks.numerics_monitor.every_n_steps={args.every_n_steps}"],
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, overrides in variants.items():
                seconds, acc = _time_run(overrides, Path(tmp) / f"{name}_{i}")
                times[name].append(seconds)
                print(f"repeat {i} {name}: {seconds:.2f}s test_acc={acc:.4f}", flush=True)
    ratios = [m / p for p, m in zip(times["plain"], times["monitored"], strict=True)]
    ratio = statistics.median(ratios)
    print(f"| run | median s | ratio |\n|---|---|---|\n| plain | {statistics.median(times['plain']):.2f} | 1.00 |\n"
          f"| NumericsMonitor(every_n_steps={args.every_n_steps}) | {statistics.median(times['monitored']):.2f} | "
          f"{ratio:.3f} |")
    print(f"overhead ratio {ratio:.3f} (per pair: {', '.join(f'{r:.3f}' for r in ratios)}; target <= 1.15)")
    result = {"times_s": times, "ratios": ratios, "ratio": ratio, "every_n_steps": args.every_n_steps,
              "target": 1.15, "ok": ratio <= 1.15}
    if args.out is not None:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
