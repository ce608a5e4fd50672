"""Tolerance audit (Lemma 1 of "Revisiting 16-bit Neural Network Training"), pure torch.

Per sample ``x`` with reference probabilities ``p`` and low-precision probabilities ``q``:

- tolerance ``tol(x) = p_(1) - p_(2)`` (largest minus second-largest reference probability);
- error ``err(x) = max_i |q_i - p_i|``;
- certificate ``tol(x) > 2 * err(x)``: then both models predict the same class (Lemma 1).

A certified sample whose top-1 differs is a *violation*; it must never happen. Probabilities are
computed in float64 from the given logits; a one-logit (binary) model is treated as two classes
``[1 - sigmoid(z), sigmoid(z)]``. A sample whose logits are not all finite (overflow) in either model
counts in ``nonfinite``, gets ``err = 1`` (the largest possible difference of two probability
vectors), is never certified and counts as a disagreement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "REPORT_KEYS",
    "Comparison",
    "certificate",
    "compare",
    "error",
    "probabilities",
    "summarize",
    "summary",
    "tolerance",
]

REPORT_KEYS: tuple[str, ...] = (
    "n_samples",
    "certified_fraction",
    "agreement",
    "violations",
    "err_mean",
    "err_p99",
    "err_max",
    "tol_mean",
    "tol_median",
    "nonfinite",
)

# Absolute slack on the certificate that covers float64 rounding of probabilities in [0, 1], so that
# ``certificate`` is sound for the vectors it is given and not only in exact arithmetic.
_MARGIN = 8 * torch.finfo(torch.float64).eps


def _check_logits(logits: Tensor, name: str) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of (N, C) logits, got {type(logits).__name__}")
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(
            f"{name} must be (N, C) logits with C >= 1, got shape {tuple(logits.shape)}; "
            "flatten or reduce the model output to one row of class logits per sample"
        )
    if not logits.is_floating_point():
        raise TypeError(f"{name} must hold floating-point logits, got dtype {logits.dtype}")


def probabilities(logits: Tensor) -> Tensor:
    """Softmax (or two-class sigmoid for one logit) of ``(N, C)`` logits, in float64."""
    _check_logits(logits, "logits")
    z = logits.detach().to(torch.float64)
    if z.shape[1] == 1:
        p1 = torch.sigmoid(z)
        return torch.cat([1.0 - p1, p1], dim=1)
    return torch.softmax(z, dim=1)


def tolerance(probs: Tensor) -> Tensor:
    """Per-sample classification tolerance: largest minus second-largest probability, shape (N,)."""
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must be (N, C) probabilities with C >= 2, got shape {tuple(probs.shape)}")
    top2 = torch.topk(probs, 2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def error(probs_low: Tensor, probs_ref: Tensor) -> Tensor:
    """Per-sample floating-point error: ``max_i |probs_low_i - probs_ref_i|``, shape (N,)."""
    if probs_low.shape != probs_ref.shape or probs_low.ndim != 2:
        raise ValueError(
            "probs_low and probs_ref must be (N, C) of the same shape, got "
            f"{tuple(probs_low.shape)} and {tuple(probs_ref.shape)}"
        )
    diff = probs_low.to(torch.float64) - probs_ref.to(torch.float64)
    return diff.abs().amax(dim=1)


def certificate(tol: Tensor, err: Tensor) -> Tensor:
    """Boolean mask of samples for which Lemma 1 guarantees the same top-1: ``tol > 2 * err``."""
    ok = torch.isfinite(tol) & torch.isfinite(err)
    return ok & (tol.to(torch.float64) > 2.0 * err.to(torch.float64) + _MARGIN)


@dataclass(frozen=True)
class Comparison:
    """Per-sample audit arrays, all of shape (N,)."""

    tol: Tensor  # float64, reference tolerance (0 where the reference is non-finite)
    err: Tensor  # float64, error (1 where either output is non-finite)
    certified: Tensor  # bool
    agree: Tensor  # bool, same top-1 (False where either output is non-finite)
    finite: Tensor  # bool, both outputs finite


def compare(logits_low: Tensor, logits_ref: Tensor) -> Comparison:
    """Per-sample tolerance, error, certificate and agreement of two ``(N, C)`` logit batches."""
    _check_logits(logits_low, "logits_low")
    _check_logits(logits_ref, "logits_ref")
    if logits_low.shape != logits_ref.shape:
        raise ValueError(
            "logits_low and logits_ref must have the same (N, C) shape, got "
            f"{tuple(logits_low.shape)} and {tuple(logits_ref.shape)}"
        )
    low = logits_low.detach().to(device="cpu", dtype=torch.float64)
    ref = logits_ref.detach().to(device="cpu", dtype=torch.float64)
    finite_low = torch.isfinite(low).all(dim=1)
    finite_ref = torch.isfinite(ref).all(dim=1)
    finite = finite_low & finite_ref
    p_low = probabilities(torch.where(finite_low[:, None], low, torch.zeros_like(low)))
    p_ref = probabilities(torch.where(finite_ref[:, None], ref, torch.zeros_like(ref)))
    tol = torch.where(finite_ref, tolerance(p_ref), torch.zeros(()).double())
    err = torch.where(finite, error(p_low, p_ref), torch.ones(()).double())
    cert = certificate(tol, err) & finite
    agree = (p_low.argmax(dim=1) == p_ref.argmax(dim=1)) & finite
    return Comparison(tol=tol, err=err, certified=cert, agree=agree, finite=finite)


def summary(c: Comparison) -> dict[str, float | int]:
    """Report dict (keys ``REPORT_KEYS``, plain python numbers) of a ``Comparison``."""
    n = int(c.tol.numel())
    if n == 0:
        raise ValueError("cannot audit an empty batch: got 0 samples")
    return {
        "n_samples": n,
        "certified_fraction": float(c.certified.double().mean()),
        "agreement": float(c.agree.double().mean()),
        "violations": int((c.certified & ~c.agree).sum()),
        "err_mean": float(c.err.mean()),
        "err_p99": float(torch.quantile(c.err, 0.99)),
        "err_max": float(c.err.max()),
        "tol_mean": float(c.tol.mean()),
        "tol_median": float(torch.quantile(c.tol, 0.5)),
        "nonfinite": int((~c.finite).sum()),
    }


def summarize(logits_low: Tensor, logits_ref: Tensor) -> dict[str, float | int]:
    """Audit report of low-precision logits against reference logits, keys ``REPORT_KEYS``.

    >>> summarize(torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]]))["certified_fraction"]
    1.0
    """
    return summary(compare(logits_low, logits_ref))
