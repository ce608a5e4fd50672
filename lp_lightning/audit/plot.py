"""Tolerance-versus-error plot of a tolerance audit (log-log scatter with the line tol = 2 * err).

Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch) and writes atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from lp_lightning.audit.tolerance import Comparison
from lp_lightning.io import atomic_path

__all__ = ["FLOOR", "plot_comparison"]

# Exact zeros (identical outputs, tied classes) cannot sit on a log axis: they are drawn at FLOOR.
FLOOR = 1e-17


def _np(t: Tensor):  # -> numpy array of float64, zeros and negatives lifted to FLOOR
    return t.detach().to(torch.float64).clamp_min(FLOOR).cpu().numpy()


def plot_comparison(c: Comparison, path: str | os.PathLike[str], title: str = "tolerance audit",
                    dpi: int = 100) -> Path:
    """Write a PNG scatter of per-sample error (x) against tolerance (y), both log scale.

    Certified samples (tol > 2*err, above the line) are blue dots, the others orange crosses,
    non-finite outputs grey squares at err = 1 and violations (certified yet disagreeing; impossible
    unless the audit is wrong) large red stars.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is a declared dependency
        raise ImportError("the audit plot needs matplotlib: pip install matplotlib (or pass plot=False)") from exc

    err, tol = _np(c.err), _np(c.tol)
    cert = c.certified.cpu().numpy()
    finite = c.finite.cpu().numpy()
    violation = (c.certified & ~c.agree).cpu().numpy()
    other = ~cert & finite
    fig = Figure(figsize=(5.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.minorticks_off()  # minor log ticks cost most of the drawing time
    n = len(err)
    ax.plot(err[cert], tol[cert], ".", ms=4, color="tab:blue", alpha=0.7,
            label=f"certified ({int(cert.sum())}/{n})")
    ax.plot(err[other], tol[other], "x", ms=4, color="tab:orange", alpha=0.8,
            label=f"not certified ({int(other.sum())})")
    if (~finite).any():
        ax.plot(err[~finite], tol[~finite], "s", ms=4, color="0.4", label=f"non-finite ({int((~finite).sum())})")
    if violation.any():
        ax.plot(err[violation], tol[violation], "*", ms=12, color="red",
                label=f"VIOLATION ({int(violation.sum())})")
    lo = max(FLOOR, float(min(err.min(), tol.min() / 2)) / 2)
    hi = 1.0
    ax.plot([lo, hi], [2 * lo, 2 * hi], "-", color="k", lw=1, label="tol = 2·err")
    ax.set_xlabel("floating-point error  max|p_low − p_ref|")
    ax.set_ylabel("tolerance  p(1) − p(2)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.92)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)
