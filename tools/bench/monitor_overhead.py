"""Wall-time overhead of NumericsMonitor(every_n_steps=50) on the default ``lp-train`` run.

    python -m lp_lightning.tools.bench.monitor_overhead --repeats 3 [--epochs 15] [--threads 1] [--out overhead.json]

Runs the default configuration (cnn on digits, fp32) with and without the monitor in one process: first one
untimed warm-up run of each variant (imports, first-run allocations, the data set; also the monitor's
one-time matplotlib import), then ``--repeats`` pairs whose order alternates (plain, monitored / monitored,
plain / ...), and prints the median of the per-pair ratios monitored / plain. Target: <= 1.15.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from lp_lightning.config import compose_config
from lp_lightning.io import write_json
from lp_lightning.tools.bench.audit_overhead import WARMUP, interleaved_schedule
from lp_lightning.tools.bench.threads import torch_threads
from lp_lightning.train import run

TARGET = 1.15


def _time_run(overrides: list[str], run_dir: Path) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, test accuracy) of one ``lp-train`` run."""
    cfg = compose_config("train", overrides)
    start, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = run(cfg, run_dir, "fp32")
    return time.perf_counter() - start, time.process_time() - cpu, metrics["test_acc"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (interleaved pairs)")
    parser.add_argument("--epochs", type=int, default=None, help="trainer.max_epochs (default: the config's)")
    parser.add_argument("--every-n-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 on a busy machine)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the untimed warm-up run of each variant")
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        return _measure(args)


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    base = ["trainer.enable_progress_bar=false"]
    if args.epochs is not None:
        base.append(f"trainer.max_epochs={args.epochs}")
    variants = {
        "plain": [*base, "callbacks.epsilon_guard=null"],  # both without the (default) guard: the monitor alone
        "monitored": [*base, "callbacks=safety", "callbacks.epsilon_guard=null",
                      f"callbacks.numerics_monitor.every_n_steps={args.every_n_steps}"],
    }
    threads = torch.get_num_threads()
    print(f"monitor_overhead: {args.repeats} pairs, threads {threads}, "
          f"warm-up {'1 run per variant (untimed)' if args.warmup else 'none'}, order alternating per pair",
          flush=True)
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    warmup: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, name in interleaved_schedule(list(variants), args.repeats, args.warmup):
            seconds, cpu_s, acc = _time_run(variants[name], Path(tmp) / f"{name}_{label}")
            if label == WARMUP:
                warmup[name] = [seconds, cpu_s]
            else:
                times[name].append(seconds)
                cpu[name].append(cpu_s)
            print(f"{'warm-up' if label == WARMUP else f'repeat {label}'} {name}: {seconds:.2f}s wall, "
                  f"{cpu_s:.2f}s cpu, test_acc={acc:.4f}", flush=True)
    ratios = [m / p for p, m in zip(times["plain"], times["monitored"], strict=True)]
    cpu_ratios = [m / p for p, m in zip(cpu["plain"], cpu["monitored"], strict=True)]
    ratio, cpu_ratio = statistics.median(ratios), statistics.median(cpu_ratios)
    med = {k: (statistics.median(times[k]), statistics.median(cpu[k])) for k in variants}
    print(f"| run | median wall s | median cpu s | wall ratio | cpu ratio |\n|---|---|---|---|---|\n"
          f"| plain | {med['plain'][0]:.2f} | {med['plain'][1]:.2f} | 1.00 | 1.00 |\n"
          f"| NumericsMonitor(every_n_steps={args.every_n_steps}) | {med['monitored'][0]:.2f} | "
          f"{med['monitored'][1]:.2f} | {ratio:.3f} | {cpu_ratio:.3f} |")
    of_medians = med["monitored"][0] / med["plain"][0]
    print(f"overhead ratio {ratio:.3f} wall, {cpu_ratio:.3f} cpu (median of per-pair ratios; wall per pair: "
          f"{', '.join(f'{r:.3f}' for r in ratios)}; ratio of median walls {of_medians:.3f}; target <= {TARGET})")
    result = {"threads": threads, "repeats": args.repeats, "warmup_s": warmup, "times_s": times, "cpu_s": cpu,
              "ratios": ratios, "cpu_ratios": cpu_ratios, "ratio": ratio, "cpu_ratio": cpu_ratio,
              "ratio_of_medians": of_medians, "every_n_steps": args.every_n_steps, "target": TARGET,
              "ok": ratio <= TARGET}
    if args.out is not None:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
