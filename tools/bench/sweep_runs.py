"""What the accuracy sweeps share: one lp-train run per folder (read back when finished), and their output."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lp_lightning.io import write_json


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
