"""Time one training step of a Linear-heavy MLP: FP8 (Float8Precision) versus bf16, side by side.

Variants run interleaved in ONE process: ``--warmup`` untimed steps of each variant first, then ``--steps``
rounds of one timed step per variant, the order within a round rotating so no variant always goes first;
the median per variant is reported, and ratios, so machine load hits all alike. On a CPU (emulated FP8) it
measures the emulation cost; on a CUDA GPU with FP8 (capability >= 8.9) it measures the real speedup with
4096-wide layers (torch.compile on). On a shared CPU pass ``--threads 1``: oversubscribed OpenMP threads
distort the ratios.

    python -m lp_lightning.tools.bench.fp8_speed [--threads 1 --width 512 --batch 256 --steps 10 --out r.json]
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
from lp_lightning.tools.bench.threads import torch_threads


def device_defaults(device: str) -> dict[str, int | bool]:
    """Sizes by device: 4096-wide layers where FP8 kernels exist, smaller ones for CPU emulation."""
    if device == "cuda":
        return {"width": 4096, "batch": 8192, "depth": 4, "steps": 20, "warmup": 3, "compile": True}
    return {"width": 512, "batch": 256, "depth": 4, "steps": 8, "warmup": 2, "compile": False}


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


def round_orders(variants: list[str], rounds: int) -> list[list[str]]:
    """The order of the variants in each timed round: rotated by one per round, so each goes first equally."""
    n = len(variants)
    return [variants[r % n:] + variants[: r % n] for r in range(rounds)]


def measure(variants: list[str], args: argparse.Namespace, device: str) -> dict[str, list[float]]:
    """Seconds of each timed step per variant: ``args.warmup`` untimed steps of every variant first, then
    ``args.steps`` interleaved rounds (one step per variant, order from ``round_orders``)."""
    steps = {v: make_step(v, args, device) for v in variants}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for order in round_orders(variants, args.steps):
        for v in order:
            fn = steps[v]
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[v].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = device_defaults(device)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key, value in defaults.items():
        if isinstance(value, bool):
            parser.add_argument(f"--{key}", action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(f"--{key}", type=int, default=value)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's; 1 on "
                        "a shared machine)")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        return _report(args, device)


def _report(args: argparse.Namespace, device: str) -> dict:
    missing = fp8_hardware_missing()
    variants = ["bf16", "fp8", "fp8_rowwise"] if device == "cuda" else ["fp32", "bf16", "fp8", "fp8_fp32"]
    threads = torch.get_num_threads()
    mode = "real FP8 kernels" if missing is None else f"emulated FP8 ({missing})"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{name}, {mode}; width {args.width}, batch {args.batch}, depth {args.depth}; threads {threads}; "
          f"{args.warmup} untimed warm-up steps per variant, then {args.steps} interleaved rounds (rotating order)",
          flush=True)
    times = measure(variants, args, device)
    seconds = {v: statistics.median(t) for v, t in times.items()}
    report = {"device": name, "fp8_mode": mode,
              "width": args.width, "batch": args.batch, "depth": args.depth, "steps": args.steps,
              "warmup": args.warmup, "compile": args.compile, "threads": threads,
              "ms_per_step": {v: 1e3 * s for v, s in seconds.items()},
              "ms_per_round": {v: [1e3 * s for s in t] for v, t in times.items()},
              "fp8_over_bf16": seconds["fp8"] / seconds["bf16"]}
    if device == "cuda":
        report["speedup_fp8_vs_bf16"] = seconds["bf16"] / seconds["fp8"]
        report["speedup_fp8_rowwise_vs_bf16"] = seconds["bf16"] / seconds["fp8_rowwise"]
    else:
        report["fp8_fp32_over_fp32"] = seconds["fp8_fp32"] / seconds["fp32"]
        report["bf16_over_fp32"] = seconds["bf16"] / seconds["fp32"]
    for v, s in seconds.items():
        rel = f"{s / seconds['bf16']:.2f}x bf16" + (f", {s / seconds['fp32']:.2f}x fp32" if "fp32" in seconds else "")
        print(f"  {v:12s} {1e3 * s:9.2f} ms/step  ({rel})")
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
