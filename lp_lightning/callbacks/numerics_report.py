"""NumericsMonitor's outputs for people: the summary as a markdown table and the layers x steps heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lp_lightning.audit.overflow import STAT_KEYS
from lp_lightning.io import atomic_path

KINDS = ("act", "grad")


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown table of ``NumericsMonitor.summary()``."""
    cols = [f"{k}_{s}" for k in KINDS for s in STAT_KEYS] + ["update_lost_share"]
    lines = ["| layer | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for layer, row in summary.items():
        cells = [f"{row[c]:.3g}" if row.get(c) is not None else "-" for c in cols]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_heatmap(path: Path, data: Tensor, layers: list[str], steps: list[int], title: str = "") -> Path:
    """PNG with one layers x steps panel per (kind, stat): log10 amax and underflow share (Agg, atomic), under
    ``title`` (model, precision and epochs)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("act", 3, "log10 act amax"), ("grad", 3, "log10 grad amax"),
              ("act", 1, "act underflow share"), ("grad", 1, "grad underflow share")]
    height = 2 + 0.35 * len(layers)
    fig = Figure(figsize=(12, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.2, right=0.98, bottom=0.9 / height, top=1 - 0.75 / height, hspace=0.5,
                        wspace=0.12)
    for ax, (kind, stat, panel) in zip(fig.subplots(2, 2, sharey=True).flat, panels, strict=True):
        values = data[:, :, KINDS.index(kind), stat].T  # layers x steps
        if stat == 3:
            values = torch.log10(values.clamp(min=1e-30))
        image = ax.imshow(values.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_title(panel)
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
        ticks = list(range(0, len(steps), max(1, len(steps) // 8)))
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
        ax.set_xlabel("step")
        fig.colorbar(image, ax=ax)
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    return Path(path)
