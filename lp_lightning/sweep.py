"""``lp-train -m``: one row per run (overrides, test metric, time, run dir), printed when the sweep ends and
written as ``sweep_summary.json`` and ``sweep_summary.csv`` into the sweep dir after every job (a sweep that
stops on a failed job keeps the rows of the jobs before it). A Hydra callback: ``hydra.callbacks`` in
``conf/train.yaml``."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lp_lightning.io import atomic_write, write_json

SUMMARY = "sweep_summary"
COLUMNS = ("job", "overrides", "status", "metric", "value", "time_s", "run_dir")


def headline(metrics: dict[str, Any]) -> tuple[str, float | None]:
    """The test metric to report: the test counterpart of the monitor (``val/acc`` -> ``test/acc``,
    ``valid/mse`` -> ``test/mse``), else the first logged test metric; ("", None) when none was logged."""
    test = metrics.get("test") or {}
    key = re.sub(r"^(val|valid|validation)(?=[/_])", "test", str(metrics.get("monitor", "")))
    key = key if key in test else next(iter(test), "")
    return key, test.get(key)


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's job dirs (with Hydra's ``.hydra/overrides.yaml`` or a ``metrics.json``), by job number."""
    found = {p.parents[1] for p in sweep_dir.glob("**/.hydra/overrides.yaml")}
    found |= {p.parent for p in sweep_dir.glob("**/metrics.json")}
    return sorted(found, key=lambda d: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(d))])


def rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job of the sweep in ``sweep_dir``; a job without ``metrics.json`` has status ``failed``."""
    sweep_dir = Path(sweep_dir)
    out = []
    for job in _job_dirs(sweep_dir):
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
        metrics_file = job / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        key, value = headline(metrics) if metrics else ("", None)
        out.append({"job": str(job.relative_to(sweep_dir)), "overrides": overrides,
                    "status": "ok" if metrics else "failed", "metric": key, "value": value,
                    "time_s": metrics.get("wall_time_s") if metrics else None, "run_dir": str(job)})
    return out


def _swept(table: list[dict[str, Any]]) -> list[list[str]]:
    """Each row's overrides without those every row shares (what the sweep varied)."""
    common = set.intersection(*(set(r["overrides"]) for r in table)) if len(table) > 1 else set()
    return [[o for o in r["overrides"] if o not in common] for r in table]


def text_table(table: list[dict[str, Any]]) -> str:
    """Fixed-width text: job, swept overrides, test metric, time, run dir."""
    lines = [["job", "overrides", "test metric", "time", "run dir"]]
    for row, swept in zip(table, _swept(table), strict=True):
        result = "failed" if row["status"] != "ok" else (
            f"{row['metric']}={row['value']:.4f}" if row["value"] is not None else "no test metric")
        time_s = "-" if row["time_s"] is None else f"{row['time_s']:.1f}s"
        lines.append([row["job"], " ".join(swept) or "-", result, time_s, row["run_dir"]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def write_summary(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Write ``sweep_summary.json`` and ``.csv`` of the jobs found in ``sweep_dir``; return the rows."""
    sweep_dir = Path(sweep_dir)
    table = rows(sweep_dir)
    write_json(sweep_dir / f"{SUMMARY}.json", {"sweep_dir": str(sweep_dir), "runs": table})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**r, "overrides": " ".join(r["overrides"])} for r in table)
    atomic_write(sweep_dir / f"{SUMMARY}.csv", lambda tmp: tmp.write_text(buf.getvalue()))
    return table


class SweepSummary(Callback):
    """Hydra callback: the summary files after each job of a multirun, and the table at its end."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            write_summary(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():  # no job ran
            return
        table = write_summary(sweep_dir)
        print(f"sweep: {len(table)} run(s), {sum(r['status'] == 'ok' for r in table)} ok")
        print(text_table(table))
        print(f"-> {sweep_dir / SUMMARY}.json, {sweep_dir / SUMMARY}.csv")
