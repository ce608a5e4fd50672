"""Tolerance-versus-error plot of a tolerance audit (log-log scatter with the line tol = 2 * err).

Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch) and writes atomically.
:class:`TolerancePlot` keeps one figure and only swaps the data, so a callback plotting every epoch
pays for the axes, ticks and fonts once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lp_lightning.audit.tolerance import Comparison
from lp_lightning.io import atomic_path

__all__ = ["FLOOR", "TolerancePlot", "plot_comparison"]

# Exact zeros (identical outputs, tied classes) cannot sit on a log axis: they are drawn at FLOOR.
FLOOR = 1e-17


def _np(t: Tensor) -> Any:  # numpy float64, zeros lifted to FLOOR
    return t.detach().to(torch.float64).clamp_min(FLOOR).cpu().numpy()


class TolerancePlot:
    """A reusable tolerance-vs-error figure: error (x) against tolerance (y), both log scale.

    Certified samples (tol > 2*err, above the line) are blue dots, the others orange crosses,
    non-finite outputs grey squares at err = 1 and violations (certified yet disagreeing; impossible
    unless the audit is wrong) large red stars.
    """

    def __init__(self, dpi: int = 100) -> None:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:  # pragma: no cover - matplotlib is a declared dependency
            raise ImportError("the audit plot needs matplotlib: pip install matplotlib (or pass plot=False)") from exc
        self.dpi = dpi
        self.fig = Figure(figsize=(5.5, 4.2))
        FigureCanvasAgg(self.fig)
        ax = self.ax = self.fig.add_subplot()
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.minorticks_off()  # minor log ticks cost most of the drawing time
        self.points = {
            "certified": ax.plot([], [], ".", ms=4, color="tab:blue", alpha=0.7)[0],
            "not certified": ax.plot([], [], "x", ms=4, color="tab:orange", alpha=0.8)[0],
            "non-finite": ax.plot([], [], "s", ms=4, color="0.4")[0],
            "VIOLATION": ax.plot([], [], "*", ms=12, color="red")[0],
        }
        self.line = ax.plot([], [], "-", color="k", lw=1, label="tol = 2·err")[0]
        ax.set_xlabel("floating-point error  max|p_low − p_ref|")
        ax.set_ylabel("tolerance  p(1) − p(2)")
        self.fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.92)

    def render(self, c: Comparison, path: str | os.PathLike[str], title: str = "tolerance audit") -> Path:
        """Draw ``c`` and write the PNG to ``path`` atomically."""
        err, tol = _np(c.err), _np(c.tol)
        finite = c.finite.cpu().numpy()
        cert = c.certified.cpu().numpy()
        masks = {"certified": cert, "not certified": ~cert & finite, "non-finite": ~finite,
                 "VIOLATION": (c.certified & ~c.agree).cpu().numpy()}
        n = len(err)
        for name, mask in masks.items():
            line = self.points[name]
            line.set_data(err[mask], tol[mask])
            count = int(mask.sum())
            shown = name in ("certified", "not certified") or count > 0
            line.set_label(f"{name} ({count}/{n})" if shown else "_hidden")
            line.set_visible(shown)
        lo = max(FLOOR, float(min(err.min(), tol.min() / 2)) / 2)
        self.line.set_data([lo, 1.0], [2 * lo, 2.0])
        self.ax.relim()
        self.ax.autoscale_view()
        self.ax.set_title(title, fontsize=10)
        self.ax.legend(loc="lower right", fontsize=8)
        with atomic_path(path) as tmp:
            self.fig.savefig(tmp, format="png", dpi=self.dpi, pil_kwargs={"compress_level": 1})
        return Path(path)


def plot_comparison(c: Comparison, path: str | os.PathLike[str], title: str = "tolerance audit",
                    dpi: int = 100) -> Path:
    """Write a PNG scatter of per-sample error (x) against tolerance (y); see :class:`TolerancePlot`."""
    return TolerancePlot(dpi=dpi).render(c, path, title)
