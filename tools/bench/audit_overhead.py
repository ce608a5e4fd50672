"""Overhead of ToleranceAudit: wall time of the default ``lp-train`` run with and without ``callbacks=audit``.

Runs both variants as separate ``lp-train`` processes, interleaved (plain, audit, plain, audit, ...), so a
busy machine slows both alike, and prints the per-run times and the median ratio (target <= 1.10).

    python -m lp_lightning.tools.bench.audit_overhead --repeats 3 --threads 1 [extra lp-train overrides]
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
from pathlib import Path

VARIANTS = {"plain": [], "audit": ["callbacks=audit"]}


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


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (interleaved)")
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads per run (0: library default)")
    parser.add_argument("overrides", nargs="*", help="extra lp-train overrides for both variants")
    args = parser.parse_args(argv)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="audit_bench_") as tmp:
        for i in range(args.repeats):
            order = list(VARIANTS) if i % 2 == 0 else list(VARIANTS)[::-1]  # alternate who goes first
            for name in order:
                r = run_once([*VARIANTS[name], *args.overrides], Path(tmp) / f"{name}_{i}", args.threads)
                results[name].append(r)
                print(f"run {i} {name:<5}  process {r['process_s']:6.2f} s  fit+test {r['fit_test_s']:6.2f} s"
                      f"  audit {r['audit_s']:5.2f} s  test_acc {r['test_acc']:.4f}", flush=True)
    summary = {}
    for key in ("process_s", "fit_test_s"):
        plain = statistics.median(r[key] for r in results["plain"])
        audit = statistics.median(r[key] for r in results["audit"])
        pairs = [a[key] / p[key] for p, a in zip(results["plain"], results["audit"], strict=True)]
        summary[key] = audit / plain
        print(f"{key:<11} median plain {plain:6.2f} s  audit {audit:6.2f} s  ratio {audit / plain:.3f}  "
              f"(per-pair ratios {', '.join(f'{x:.3f}' for x in pairs)})")
    in_run = statistics.median(r["audit_s"] / (r["fit_test_s"] - r["audit_s"]) for r in results["audit"])
    print(f"in-run: audit/seconds summed over epochs / rest of fit+test of the same run: +{in_run:.1%} "
          "(same process, so immune to load from other programs; excludes the background plot thread)")
    verdict = "OK" if summary["process_s"] <= 1.10 else "ABOVE TARGET"
    print(f"overhead ratio (process wall time, target <= 1.10): {summary['process_s']:.3f} {verdict}")
    return summary


if __name__ == "__main__":
    main()
