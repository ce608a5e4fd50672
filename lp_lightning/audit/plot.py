"""Tolerance-versus-error plot of a tolerance audit (log-log scatter with the line tol = 2 * err).

Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch) and writes atomically.
:class:`TolerancePlot` keeps one figure and only swaps the data, so a callback plotting every epoch
pays for the axes, ticks and fonts once (about 10x cheaper than a fresh figure per epoch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lp_lightning.audit.tolerance import Comparison
from lp_lightning.io import atomic_path

__all__ = ["FLOOR", "TolerancePlot", "plot_comparison"]

# Exact zeros (identical outputs, tied classes) cannot sit on a log axis: values below FLOOR are drawn at
# FLOOR (float32 vs float64 errors are ~1e-9, so nothing real hides there).
FLOOR = 1e-12


def _np(t: Tensor) -> Any:  # numpy float64, zeros lifted to FLOOR
    return t.detach().to(torch.float64).clamp_min(FLOOR).cpu().numpy()


class TolerancePlot:
    """A reusable tolerance-vs-error figure: error (x) against tolerance (y), both log scale.

    Certified samples (tol > 2*err, above the line) are blue dots, the others orange crosses,
    non-finite outputs grey squares at err = 1 and violations (certified yet disagreeing; impossible
    unless the audit is wrong) large red stars. The axes span fixed decades [FLOOR, 2] so that epochs
    are comparable and the static parts (axes, ticks, line, legend) are drawn once; each render only
    blits the points and the title onto that background.
    """

    def __init__(self, dpi: int = 100) -> None:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:  # pragma: no cover - matplotlib is a declared dependency
            raise ImportError("the audit plot needs matplotlib: pip install matplotlib (or pass plot=False)") from exc
        self.fig = Figure(figsize=(5.5, 4.2), dpi=dpi)
        self.canvas = FigureCanvasAgg(self.fig)
        ax = self.ax = self.fig.add_subplot()
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.minorticks_off()
        ax.set_xlim(FLOOR / 2, 2.0)
        ax.set_ylim(FLOOR / 2, 2.0)
        self.points = {
            "certified": ax.plot([], [], ".", ms=4, color="tab:blue", alpha=0.7, label="certified")[0],
            "not certified": ax.plot([], [], "x", ms=4, color="tab:orange", alpha=0.8, label="not certified")[0],
            "non-finite": ax.plot([], [], "s", ms=4, color="0.4", label="non-finite (err := 1)")[0],
            "VIOLATION": ax.plot([], [], "*", ms=12, color="red", label="violation")[0],
        }
        ax.plot([FLOOR / 2, 1.0], [FLOOR, 2.0], "-", color="k", lw=1, label="tol = 2·err")
        ax.set_xlabel(f"floating-point error  max|p_low − p_ref|  (0 drawn at {FLOOR:.0e})")
        ax.set_ylabel("tolerance  p(1) − p(2)")
        ax.legend(loc="lower right", fontsize=8)
        self.title = ax.set_title(" ", fontsize=9)
        self.fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.89)
        self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(self.fig.bbox)

    def render(self, c: Comparison, path: str | os.PathLike[str], title: str = "tolerance audit") -> Path:
        """Draw ``c`` on the static background and write the PNG to ``path`` atomically."""
        from PIL import Image

        err, tol = _np(c.err), _np(c.tol)
        finite = c.finite.cpu().numpy()
        cert = c.certified.cpu().numpy()
        masks = {"certified": cert, "not certified": ~cert & finite, "non-finite": ~finite,
                 "VIOLATION": (c.certified & ~c.agree).cpu().numpy()}
        self.canvas.restore_region(self.background)
        for name, mask in masks.items():
            self.points[name].set_data(err[mask], tol[mask])
            self.ax.draw_artist(self.points[name])
        counts = ", ".join(f"{name} {int(mask.sum())}" for name, mask in masks.items()
                           if mask.any() or name in ("certified", "not certified"))
        self.title.set_text(f"{title}\n{counts} of {len(err)}")
        self.ax.draw_artist(self.title)
        image = Image.fromarray(np.asarray(self.canvas.buffer_rgba())).convert("RGB")
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG", compress_level=1)
        return Path(path)


def plot_comparison(c: Comparison, path: str | os.PathLike[str], title: str = "tolerance audit",
                    dpi: int = 100) -> Path:
    """Write a PNG scatter of per-sample error (x) against tolerance (y); see :class:`TolerancePlot`."""
    return TolerancePlot(dpi=dpi).render(c, path, title)
