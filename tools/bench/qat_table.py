"""The QAT robustness table: per-column mean and worst seed, the markdown rows and the issue-17 bars missed."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

# (column, header) of the markdown table; every cell is "mean / worst" over the seeds
COLUMNS = (("fp32", "fp32"), ("int8_qat", "int8 QAT"), ("int8_converted", "int8 converted"),
           ("int8_onnx", "int8 ONNX"), ("int4w_qat", "int4w QAT"), ("int4w_converted", "int4w converted"),
           ("ao_qat", "torch.ao QAT"), ("ao_converted", "torch.ao converted"))
AGREEMENTS = ("int8_agreement", "int8_onnx_agreement", "int4w_agreement")
TARGETS = {"int8": (1.5, 3.0), "int4w": (2.0, 4.0)}  # points below fp32 allowed (mean, worst seed)


def summarize(runs: Mapping[Any, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and worst seed of every column (worst = min, since every column is an accuracy or agreement)."""
    columns = sorted({k for r in runs.values() for k in r})
    return {c: {"mean": statistics.fmean(r[c] for r in runs.values() if c in r),
                "worst": min(r[c] for r in runs.values() if c in r)} for c in columns}


def _cell(summary: Mapping[str, Mapping[str, float]], key: str) -> str:
    s = summary.get(key)
    return "" if s is None else f"{s['mean']:.3f} / {s['worst']:.3f}"


def markdown_table(models: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per model and setting (from scratch, fine-tuned): accuracy "mean / worst" per column, the lowest
    agreement of converted and ONNX models with their QAT model (worst seed), and the step-time ratios."""
    head = ["model", "setting", *(h for _, h in COLUMNS), "agreement (min)", "step ours int8 / fp32",
            "step torch.ao / fp32"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name, result in models.items():
        summary, speed = result["summary"], result.get("speed") or {}
        for setting, p in (("from scratch", ""), ("fine-tuned", "ft_")):
            if setting == "fine-tuned" and not any(k.startswith("ft_") for k in summary):
                continue
            cells = [_cell(summary, "fp32" if c == "fp32" else p + c) for c, _ in COLUMNS]
            agree = [summary[p + a]["worst"] for a in AGREEMENTS if p + a in summary]
            ratios = [f"{speed[k]:.2f}x" if p == "" and k in speed else "" for k in ("int8_ratio", "ao_ratio")]
            agreement = f"{min(agree):.3f}" if agree else ""
            lines.append("| " + " | ".join([name, setting, *cells, agreement, *ratios]) + " |")
    return "\n".join(lines)


def misses(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The issue-17 bars a result misses: converted within TARGETS points of fp32 (mean, worst seed; fine-tuned
    within 1 point), agreement >= 0.99, ours ahead of torch.ao (converted int8 vs converted, mean and worst),
    int8 step <= 1.3x fp32."""
    out = []
    for name, result in models.items():
        s, speed = result["summary"], result.get("speed") or {}
        ref = s["fp32"]
        for p, setting in (("", "from scratch"), ("ft_", "fine-tuned")):
            for prec, (d_mean, d_worst) in TARGETS.items():
                c = s.get(f"{p}{prec}_converted")
                if c is None:
                    continue
                d_mean, d_worst = (1.0, 1.0) if p else (d_mean, d_worst)
                for stat, limit in (("mean", d_mean), ("worst", d_worst)):
                    if 100 * (ref[stat] - c[stat]) > limit:
                        out.append(f"{name} {setting} {prec} converted {stat}: {100 * (ref[stat] - c[stat]):.1f} "
                                   f"points below fp32 (bar {limit:g})")
            ao = s.get(f"{p}ao_converted")
            ours = s.get(f"{p}int8_converted")
            for stat in ("mean", "worst"):
                if ao and ours and ours[stat] < ao[stat]:
                    out.append(f"{name} {setting} int8 converted {stat} {ours[stat]:.3f} behind torch.ao "
                               f"{ao[stat]:.3f}")
            out += [f"{name} {setting} {a} worst {s[p + a]['worst']:.3f} < 0.99" for a in AGREEMENTS
                    if p + a in s and s[p + a]["worst"] < 0.99]
        if speed.get("int8_ratio", 0.0) > 1.3:
            out.append(f"{name} int8 step {speed['int8_ratio']:.2f}x fp32 (goal <= 1.3x)")
    return out
