"""Overhead of ToleranceAudit on training: the default ``lp-train`` run with and without ``callbacks=audit``.

Runs both variants as separate ``lp-train`` processes: first one untimed warm-up process of each (file
caches, byte-code, data set), then ``--repeats`` pairs whose order alternates (plain, audit / audit, plain /
...), so a busy machine and drift hit both alike. Three measures are printed side by side:

- fit+test: the time ``lp-train`` itself reports (``metrics.json`` ``wall_time_s``: fit, validate and test,
  without Python/Lightning/Hydra start-up). It contains everything the audit adds to a run (reference
  forwards, JSON, the background PNG thread competing for the GIL and CPU, waiting for the PNGs when fit ends).
  **The verdict (target <= 1.10) uses this one**: the median of the per-pair ratios audit / plain.
- process: wall time of the whole process; the same audit cost diluted by start-up, for reference only.
- in-run: ``audit/seconds`` summed over epochs / the rest of fit+test of the same run. Same process, so
  immune to load from other programs, but it misses the plot thread: a lower bound.

    python -m lp_lightning.tools.bench.audit_overhead --repeats 5 --threads 1 [extra lp-train overrides]
    python -m lp_lightning.tools.bench.audit_overhead --threads 1 --audit-override callbacks.audit.plot=false
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

VARIANTS = {"plain": [], "audit": ["callbacks=audit"]}
TARGET = 1.10
WARMUP = "warm-up"


def interleaved_schedule(variants: Sequence[str], repeats: int, warmup: bool = True) -> list[tuple[str | int, str]]:
    """``(label, variant)`` in run order: one untimed ``"warm-up"`` run of each variant first (if ``warmup``),
    then ``repeats`` rounds labelled 0, 1, ... whose order alternates (forward on even, reversed on odd rounds)
    so neither variant always runs first."""
    order = list(variants)
    schedule: list[tuple[str | int, str]] = [(WARMUP, v) for v in order] if warmup else []
    for i in range(repeats):
        schedule += [(i, v) for v in (order if i % 2 == 0 else order[::-1])]
    return schedule


def run_once(extra: list[str], out: Path, threads: int | None) -> dict[str, float]:
    """One ``lp-train`` process; returns its process wall time and the fit+test time it reports."""
    env = dict(os.environ)
    if threads:  # on a shared machine, oversubscribed OpenMP threads make timings meaningless
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "lp_lightning.train", "trainer.enable_progress_bar=false",
           f"hydra.run.dir={out}", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"lp-train failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    audit_s = 0.0  # the audit's own time per epoch, logged by ToleranceAudit as audit/seconds
    for path in out.glob("logs/version_*/metrics.csv"):
        rows = list(csv.DictReader(path.open()))
        audit_s += sum(float(r["audit/seconds"]) for r in rows if r.get("audit/seconds"))
    return {"process_s": wall, "fit_test_s": float(metrics["wall_time_s"]), "test_acc": metrics["test_acc"],
            "audit_s": audit_s}


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Medians, per-pair ratios (pair i: audit_i / plain_i) and their median for both wall-time measures,
    the in-run share, and the verdict, which is based on the fit+test per-pair median."""
    summary: dict[str, Any] = {}
    for key in ("fit_test_s", "process_s"):
        plain = statistics.median(r[key] for r in results["plain"])
        audit = statistics.median(r[key] for r in results["audit"])
        pairs = [a[key] / p[key] for p, a in zip(results["plain"], results["audit"], strict=True)]
        summary[key] = {"plain_median_s": plain, "audit_median_s": audit, "pair_ratios": pairs,
                        "ratio": statistics.median(pairs), "ratio_of_medians": audit / plain}
    summary["in_run"] = statistics.median(r["audit_s"] / (r["fit_test_s"] - r["audit_s"]) for r in results["audit"])
    summary["verdict_measure"] = "fit_test_s"
    summary["ratio"] = summary["fit_test_s"]["ratio"]
    summary["target"] = TARGET
    summary["ok"] = summary["ratio"] <= TARGET
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (interleaved pairs)")
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads per run (0: library default)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the untimed warm-up run of each variant")
    parser.add_argument("--audit-override", action="append", default=[], metavar="KEY=VALUE",
                        help="lp-train override for the audit variant only (repeatable): callbacks.audit.plot=false")
    parser.add_argument("--out", type=Path, default=None, help="write the runs and the summary as JSON here")
    parser.add_argument("overrides", nargs="*", help="extra lp-train overrides for both variants")
    args = parser.parse_args(argv)
    variants = {"plain": VARIANTS["plain"], "audit": [*VARIANTS["audit"], *args.audit_override]}
    print(f"audit_overhead: {' '.join(variants['audit'])} vs plain; {args.repeats} pairs, "
          f"threads {args.threads or 'default'}, "
          f"warm-up {'1 run per variant (untimed)' if args.warmup else 'none'}, order alternating per pair",
          flush=True)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    warmups: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="audit_bench_") as tmp:
        for label, name in interleaved_schedule(list(variants), args.repeats, args.warmup):
            r = run_once([*variants[name], *args.overrides], Path(tmp) / f"{name}_{label}", args.threads)
            if label == WARMUP:
                warmups[name] = r
            else:
                results[name].append(r)
            print(f"{'warm-up' if label == WARMUP else f'run {label}':<7} {name:<5}  process {r['process_s']:6.2f} s"
                  f"  fit+test {r['fit_test_s']:6.2f} s  audit {r['audit_s']:5.2f} s  test_acc {r['test_acc']:.4f}",
                  flush=True)
    summary = summarize(results)
    print("| measure | median plain s | median audit s | ratio (median of pairs) | ratio of medians | pairs |\n"
          "|---|---|---|---|---|---|")
    for key, label in (("fit_test_s", "fit+test (verdict)"), ("process_s", "process wall")):
        s = summary[key]
        print(f"| {label} | {s['plain_median_s']:.2f} | {s['audit_median_s']:.2f} | {s['ratio']:.3f} | "
              f"{s['ratio_of_medians']:.3f} | {', '.join(f'{x:.3f}' for x in s['pair_ratios'])} |")
    print(f"in-run: audit/seconds summed over epochs / rest of fit+test of the same run: +{summary['in_run']:.1%} "
          "(same process, so immune to load from other programs; excludes the background plot thread)")
    verdict = "OK" if summary["ok"] else "ABOVE TARGET"
    print(f"overhead ratio (fit+test time, median of per-pair ratios, target <= {TARGET:.2f}): "
          f"{summary['ratio']:.3f} {verdict}")
    if args.out is not None:
        from lp_lightning.io import write_json

        write_json(args.out, {"repeats": args.repeats, "threads": args.threads, "overrides": args.overrides,
                              "audit_overrides": args.audit_override,
                              "runs": results, "warmup_runs": warmups, **summary})
    return summary


if __name__ == "__main__":
    main()
