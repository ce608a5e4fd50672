"""``export_report.json`` layout and the printed table.

Per format (DESIGN keys): ``path, size_bytes, accuracy, agreement, certified_fraction,
max_abs_logit_diff, latency_ms_p50, latency_ms_p90, batch_size, threads, op_types``. The p50/p90 pair is
at ``batch_size`` (the first latency batch size, 1 by default); every measured batch size is in the
nested ``latency_ms: {"<batch>": {"p50": ..., "p90": ...}}``. Extra keys: ``violations``, ``n_samples``,
``size_ratio`` and ``latency_ratio`` (vs fp32 when exported), ``quantization`` (how the format was made),
and for FakeQuantPrecision checkpoints ``agreement_fake_quant``/``max_abs_logit_diff_fake_quant`` against the
PyTorch fake-quant model (the model as trained) besides the plain fp32 model of the DESIGN keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

FORMATS = ("fp32", "int8", "int4")  # the default formats
# formats exported only when asked: int4_qdq is int4 with MatMulNBits as DequantizeLinear -> MatMul (mobile providers)
EXTRA_FORMATS = ("int4_qdq",)
ALL_FORMATS = FORMATS + EXTRA_FORMATS


def format_entry(metrics: Mapping[str, Any], latency: Mapping[int, Mapping[str, float]], batch_sizes: Sequence[int],
                 threads: int, quantization: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One ``formats[fmt]`` entry from evaluation metrics and interleaved latency percentiles."""
    main = int(batch_sizes[0])
    return {
        "path": metrics["path"],
        "size_bytes": int(metrics["size_bytes"]),
        "accuracy": metrics["accuracy"],
        "agreement": metrics["agreement"],
        "certified_fraction": metrics["certified_fraction"],
        "violations": metrics["violations"],
        "max_abs_logit_diff": metrics["max_abs_logit_diff"],
        "nonfinite": metrics.get("nonfinite", 0),
        "latency_ms_p50": latency[main]["p50"],
        "latency_ms_p90": latency[main]["p90"],
        "batch_size": main,
        "threads": int(threads),
        "op_types": list(metrics["op_types"]),
        "latency_ms": {str(b): dict(latency[int(b)]) for b in batch_sizes},
        "n_samples": metrics["n_samples"],
        "quantization": dict(quantization or {}),
        **{k: v for k, v in metrics.items() if k.startswith(("agreement_", "max_abs_logit_diff_"))},
    }


def add_ratios(formats: dict[str, dict[str, Any]]) -> None:
    """Add ``size_ratio`` and ``latency_ratio`` (per batch) against fp32 to every entry, in place."""
    base = formats.get("fp32")
    if not base:
        return
    for entry in formats.values():
        entry["size_ratio"] = entry["size_bytes"] / base["size_bytes"]
        entry["latency_ratio"] = {b: entry["latency_ms"][b]["p50"] / base["latency_ms"][b]["p50"]
                                  for b in entry["latency_ms"] if b in base["latency_ms"]}


def check_thresholds(formats: Mapping[str, Mapping[str, Any]], thresholds: Mapping[str, float]) -> list[str]:
    """Messages for every missed agreement threshold and every Lemma-1 violation (must be 0)."""
    failures = []
    for fmt, entry in formats.items():
        need = thresholds.get(fmt)
        if need is not None and entry["agreement"] < need:
            failures.append(f"{fmt}: agreement {entry['agreement']:.4f} < threshold {need:.4f}")
        if entry.get("violations"):
            failures.append(f"{fmt}: {entry['violations']} Lemma-1 violations (certified but disagreeing)")
    return failures


def table(report: Mapping[str, Any]) -> str:
    """Fixed-width text table of the report's formats."""
    formats = report["formats"]
    batches = next(iter(formats.values()))["latency_ms"].keys() if formats else []
    head = ["format", "size_kB", "x_fp32", "acc", "agree", "certified", "max|dlogit|"]
    head += [f"p50_ms@b{b}" for b in batches] + ["key ops"]
    rows = [head]
    for fmt, e in formats.items():
        key_ops = [o for o in e["op_types"] if o.startswith(("Q", "MatMulNBits", "DequantizeLinear", "Conv",
                                                              "Gemm", "MatMul", "FusedConv", "FusedGemm"))]
        rows.append([fmt, f"{e['size_bytes'] / 1024:.1f}", f"{e['size_ratio']:.3f}" if "size_ratio" in e else "-",
                     "-" if e["accuracy"] is None else f"{e['accuracy']:.4f}", f"{e['agreement']:.4f}",
                     f"{e['certified_fraction']:.4f}",
                     f"{e['max_abs_logit_diff']:.3g}"]
                    + [f"{e['latency_ms'][b]['p50']:.3f}" for b in batches] + [",".join(key_ops)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
