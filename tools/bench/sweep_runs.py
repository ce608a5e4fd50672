"""What the accuracy sweeps share: one lp-train run per folder (read back when finished), and their output."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lp_lightning.io import write_json
from lp_lightning.tools.bench.threads import torch_threads


def add_sweep_arguments(parser: argparse.ArgumentParser, root: str) -> None:
    """``--seeds``, ``--threads``, ``--root`` (default ``root``) and ``--out``, as every accuracy sweep takes them."""
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (accuracy moves with it)")
    parser.add_argument("--root", type=Path, default=Path(root), help="run folders (reused)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")


def run_sweep(args: argparse.Namespace, sweep: Callable[[], Any], table: Callable[[Any], str]) -> dict[str, Any]:
    """``sweep()`` on ``args.threads`` torch threads with Lightning's info lines off, then :func:`report`."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with torch_threads(args.threads):
        results = sweep()
    return report(results, table, args.seeds, args.threads, args.out)


def cell(values: list[float], ref: float | None) -> str:
    """``mean (difference to ref in points), worst`` of accuracies in [0, 1], as percent (no difference
    without ``ref``)."""
    mean = statistics.mean(values)
    diff = "" if ref is None else f" ({100 * (mean - ref):+.1f})"
    return f"{100 * mean:.1f}{diff}, worst {100 * min(values):.1f}"


def run_accuracy(root: Path, overrides: list[str], precision: str) -> float:
    """Test accuracy of one ``lp-train`` run into ``root`` (read back when ``root/metrics.json`` exists)."""
    metrics = root / "metrics.json"
    if not metrics.exists():
        from lp_lightning.config import compose_config
        from lp_lightning.train import run

        run(compose_config("train", [*overrides, "trainer.enable_progress_bar=false"]), root, precision)
    saved = json.loads(metrics.read_text())
    value = saved.get("test_acc")
    return float(value if value is not None else (saved.get("test") or {})["test_acc"])


def report(results: Any, table: Callable[[Any], str], seeds: list[int], threads: int, out: Path | None
           ) -> dict[str, Any]:
    """Print the markdown table (and write the JSON); returns ``{"accuracy", "markdown", "seeds", "threads"}``."""
    markdown = table(results)
    print(f"Test accuracy %, mean over seeds {seeds} (difference to fp32 in points), worst seed; "
          f"{threads} thread(s)\n")
    print(markdown)
    if out:
        write_json(out, {"seeds": seeds, "threads": threads, "accuracy": results})
    return {"accuracy": results, "markdown": markdown, "seeds": seeds, "threads": threads}
