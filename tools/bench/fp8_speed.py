"""Time one training step of a Linear-heavy MLP: FP8 (Float8Precision) versus bf16, side by side.

Variants run interleaved in ONE process (round-robin, median per variant), so machine load hits all
alike; the report is ratios. On a CPU (emulated FP8) it measures the emulation cost; on a CUDA GPU
with FP8 (capability >= 8.9) it measures the real speedup with 4096-wide layers (torch.compile on).

    python -m lp_lightning.tools.bench.fp8_speed [--width 512 --batch 256 --steps 10 --out r.json]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from lp_lightning.io import write_json
from lp_lightning.precision.fp8 import Float8Precision, fp8_hardware_missing


def device_defaults(device: str) -> dict[str, int | bool]:
    """Sizes by device: 4096-wide layers where FP8 kernels exist, smaller ones for CPU emulation."""
    if device == "cuda":
        return {"width": 4096, "batch": 8192, "depth": 4, "steps": 20, "compile": True}
    return {"width": 512, "batch": 256, "depth": 4, "steps": 8, "compile": False}


def linear_heavy(width: int, depth: int) -> nn.Module:
    """``depth`` Linear(width, width)+ReLU layers and a 10-way head: almost all time is in matmuls."""
    layers: dict[str, nn.Module] = {}
    for i in range(depth):
        layers[f"fc{i}"], layers[f"act{i}"] = nn.Linear(width, width), nn.ReLU()
    return nn.Sequential(OrderedDict(**layers, classifier=nn.Linear(width, 10)))


def make_step(variant: str, args: argparse.Namespace, device: str) -> Callable[[], None]:
    """A closure running one forward/backward/SGD step of ``variant``."""
    torch.manual_seed(0)
    model = linear_heavy(args.width, args.depth)
    context: Callable[[], AbstractContextManager] = contextlib.nullcontext
    if variant.startswith("fp8"):
        recipe, compute = {"fp8": ("tensorwise", "bfloat16"), "fp8_rowwise": ("rowwise", "bfloat16"),
                           "fp8_fp32": ("tensorwise", "float32")}[variant]
        plugin = Float8Precision(recipe=recipe, compute_dtype=compute)
        model = plugin.convert_module(model)
        context = plugin.forward_context
        dtype = plugin.compute_dtype
    else:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[variant]
        model = model.to(dtype)
    model = model.to(device)
    if args.compile:
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, args.width, device=device, dtype=dtype)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def step() -> None:
        with context():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(variants: list[str], args: argparse.Namespace, device: str) -> dict[str, float]:
    """Median seconds per step of each variant, timed round-robin after warm-up."""
    steps = {v: make_step(v, args, device) for v in variants}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in steps.values():
        for _ in range(3 if args.compile else 1):
            fn()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.steps):
        for v, fn in steps.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[v].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = device_defaults(device)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key, value in defaults.items():
        if isinstance(value, bool):
            parser.add_argument(f"--{key}", action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(f"--{key}", type=int, default=value)
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    missing = fp8_hardware_missing()
    variants = ["bf16", "fp8", "fp8_rowwise"] if device == "cuda" else ["fp32", "bf16", "fp8", "fp8_fp32"]
    seconds = measure(variants, args, device)
    mode = "real FP8 kernels" if missing is None else f"emulated FP8 ({missing})"
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "fp8_mode": mode,
              "width": args.width, "batch": args.batch, "depth": args.depth, "steps": args.steps,
              "compile": args.compile, "threads": torch.get_num_threads(),
              "ms_per_step": {v: 1e3 * s for v, s in seconds.items()},
              "fp8_over_bf16": seconds["fp8"] / seconds["bf16"]}
    if device == "cuda":
        report["speedup_fp8_vs_bf16"] = seconds["bf16"] / seconds["fp8"]
        report["speedup_fp8_rowwise_vs_bf16"] = seconds["bf16"] / seconds["fp8_rowwise"]
    else:
        report["fp8_fp32_over_fp32"] = seconds["fp8_fp32"] / seconds["fp32"]
        report["bf16_over_fp32"] = seconds["bf16"] / seconds["fp32"]
    print(f"{report['device']}, {mode}; width {args.width}, batch {args.batch}, depth {args.depth}")
    for v, s in seconds.items():
        print(f"  {v:12s} {1e3 * s:9.2f} ms/step  ({s / seconds['bf16']:.2f}x bf16)")
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
