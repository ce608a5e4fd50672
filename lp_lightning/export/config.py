"""``ExportConfig``: what ``run_export`` exports and how it measures it, validated on construction."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lp_lightning.export.int4 import INT4_BLOCK_SIZES
from lp_lightning.export.report import ALL_FORMATS, FORMATS

INT4_ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# integer fields and their minimum
_INT_FIELDS = {"threads": 1, "warmup": 0, "iters": 1, "calib_batches": 1, "calib_batch_size": 1, "seed": 0}


def _is_int(value: Any) -> bool:
    """A real integer (``True``/``False`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A real int or float (not a bool, not a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_list(value: Any) -> bool:
    """A list-like sequence (a string is not)."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _check_formats(formats: Any) -> None:
    """``formats``: a non-empty list of names from :data:`ALL_FORMATS`."""
    if not _is_list(formats) or not formats or any(f not in ALL_FORMATS for f in formats):
        shown = list(formats) if _is_list(formats) else formats
        raise ValueError(f"formats={shown!r} is invalid; allowed: a non-empty list of {list(ALL_FORMATS)}")


def _check_thresholds(thresholds: Any) -> None:
    """``thresholds``: a mapping format -> minimum top-1 agreement, a number in [0, 1]."""
    if not isinstance(thresholds, Mapping):
        raise ValueError(f"thresholds={thresholds!r} must be a mapping format -> minimum agreement in [0, 1], "
                         f"e.g. thresholds.int8=0.98")
    for fmt, value in thresholds.items():
        if fmt not in ALL_FORMATS:
            raise ValueError(f"thresholds key {fmt!r} is unknown; allowed: {list(ALL_FORMATS)}")
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"thresholds.{fmt}={value!r} must be a number in [0, 1] (minimum top-1 agreement)")


def _check_int(name: str, value: Any, minimum: int) -> None:
    """An integer field: a real int >= ``minimum``."""
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _check_choice(name: str, value: Any, allowed: Sequence[int]) -> None:
    """An integer field restricted to ``allowed``."""
    if not _is_int(value) or value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid; allowed: {list(allowed)}")


def _check_batch_sizes(sizes: Any) -> None:
    """``latency_batch_sizes``: a non-empty list of integers >= 1."""
    if not _is_list(sizes) or not sizes or not all(_is_int(b) and b >= 1 for b in sizes):
        shown = list(sizes) if _is_list(sizes) else sizes
        raise ValueError(f"latency_batch_sizes={shown!r} must be a non-empty list of integers >= 1, e.g. [1, 64]")


def _check_parity_atol(value: Any) -> None:
    """``parity_atol``: a finite number > 0 (NaN would disable the parity check)."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"parity_atol={value!r} must be a finite number > 0, e.g. 1e-4")


def _check_bool(name: str, value: Any) -> None:
    """A switch: true or false."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid; allowed: true or false")


def _check_reduce_range(value: Any) -> None:
    """``reduce_range``: true, false or null (null: decided by the CPU's VNNI support)."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"reduce_range={value!r} is invalid; allowed: true, false or null (auto: true without VNNI)")


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how to measure it (defaults match ``conf/export.yaml``).

    Raises ValueError naming the field and its value when a field is out of range or of the wrong type.
    """

    formats: Sequence[str] = FORMATS
    thresholds: Mapping[str, float] = field(default_factory=lambda: {"int8": 0.98, "int4": 0.95, "int4_qdq": 0.95})
    threads: int = 1
    latency_batch_sizes: Sequence[int] = (1, 64)
    warmup: int = 10
    iters: int = 50
    calib_batches: int = 8
    calib_batch_size: int = 64
    parity_atol: float = 1e-4
    int4_block_size: int = 32
    int4_accuracy_level: int = 4
    reduce_range: bool | None = None
    seed: int = 0
    edge: bool = False  # ORT Mobile checks: NNAPI/CoreML usability, fixed-shape and ORT-format variants

    def __post_init__(self) -> None:
        _check_formats(self.formats)
        _check_thresholds(self.thresholds)
        for name, minimum in _INT_FIELDS.items():
            _check_int(name, getattr(self, name), minimum)
        _check_batch_sizes(self.latency_batch_sizes)
        _check_parity_atol(self.parity_atol)
        _check_choice("int4_block_size", self.int4_block_size, INT4_BLOCK_SIZES)
        _check_choice("int4_accuracy_level", self.int4_accuracy_level, INT4_ACCURACY_LEVELS)
        _check_reduce_range(self.reduce_range)
        _check_bool("edge", self.edge)
