"""Pure 16-bit: memory (params + grads + optimizer state) and training-step time, side by side in one run.

    python -m lp_lightning.tools.bench.half_speed --models mlp cnn --rounds 5 --threads 1 --out half_speed.json

Memory: bytes after one Lightning step in fp32 and in pure fp16/bf16 (same model, same optimizer; the default
update="auto": kahan for fp16, stochastic rounding for bf16; and bf16 with update="kahan"/"nearest") and
their ratio, plus the extra bytes of
fp32 norm running statistics and the fp32 stand-ins alive only inside the optimizer step.
Speed: min and median step time (forward + backward + optimizer step, by a callback) of
fp32, Lightning's "16-true"/"bf16-true", PureHalfPrecision compute="native", "native_fp32_attention",
"fp32_accumulate" and "auto" (timed after its own trial steps; its choice is printed), interleaved round
by round so that load on the machine hits every variant alike. Ratios (of the
min by default: on a shared machine the median mostly measures time spent descheduled):
native / Lightning (target <= 1.05) and auto / fp32 (target <= 1.0 on a CPU).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lp_lightning.data import DigitsDataModule
from lp_lightning.io import write_json
from lp_lightning.models import Classifier
from lp_lightning.precision import PureHalfPrecision
from lp_lightning.precision.fp32_compute import compute_candidates
from lp_lightning.precision.norm_stats import stats_bytes

NET_KWARGS = {"mlp": {"hidden": [256, 256]}, "cnn": {"channels": [32, 64], "blocks_per_stage": 1},
              "vit": {"dim": 64, "depth": 2, "heads": 4, "mlp_ratio": 2}}
OPTIMIZERS = {"sgd": {"name": "sgd", "lr": 0.01, "momentum": 0.9}, "adam": {"name": "adam", "lr": 1e-3, "eps": 1e-4}}


class StepTimer(Callback):
    """Wall time of every training batch (forward, backward, optimizer step) and the bytes it holds."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.times: list[float] = []
        self.grad_bytes = 0
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
        self.sync()
        self._start = time.perf_counter()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.grad_bytes = sum(p.grad.nbytes for p in pl_module.parameters() if p.grad is not None)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.sync()
        self.times.append(time.perf_counter() - self._start)


def variants(dtype: str) -> dict[str, dict[str, Any]]:
    """Trainer kwargs per variant name for one 16-bit dtype."""
    tag, lightning = ("fp16", "16-true") if dtype == "float16" else ("bf16", "bf16-true")
    return {
        f"lightning {lightning}": {"precision": lightning},
        f"{tag} native": {"plugins": [PureHalfPrecision(dtype, compute="native")]},
        f"{tag} native_fp32_attention": {"plugins": [PureHalfPrecision(dtype, compute="native_fp32_attention")]},
        f"{tag} fp32_accumulate": {"plugins": [PureHalfPrecision(dtype, compute="fp32_accumulate")]},
        f"{tag} auto": {"plugins": [PureHalfPrecision(dtype, compute="auto")]},
    }


def trial_steps(kwargs: dict[str, Any], device: str) -> int:
    """Training steps ``compute="auto"`` spends timing its candidates before it decides (0 for other variants)."""
    from lp_lightning.precision.compute_trial import ComputeTrial

    plugin = next(iter(kwargs.get("plugins", [])), None)
    if not isinstance(plugin, PureHalfPrecision) or plugin.compute != "auto":
        return 0
    return len(ComputeTrial(compute_candidates("auto", plugin.compute_dtype, device)[0]).schedule) + 1


def fit_steps(net: str, optimizer: dict[str, Any], steps: int, batch_size: int, accelerator: str,
              sync: Callable[[], None], **trainer_kwargs: Any) -> tuple[StepTimer, L.Trainer, Classifier]:
    """Train ``steps`` batches; return the timer, the trainer and the model."""
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=batch_size)
    model = Classifier(net=net, input_shape=list(dm.input_shape), num_classes=dm.num_classes,
                       net_kwargs=NET_KWARGS[net], optimizer=optimizer)
    timer = StepTimer(sync)
    trainer = L.Trainer(max_steps=steps, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[timer], **trainer_kwargs)
    trainer.fit(model, datamodule=dm)
    return timer, trainer, model


def memory(net: str, opt_name: str, accelerator: str, sync: Callable[[], None]) -> dict[str, Any]:
    """Bytes of parameters, gradients and optimizer state after one step: fp32 vs pure fp16/bf16 with the default
    update (fp16: kahan, bf16: stochastic rounding), bf16 with ``update="kahan"`` (a 16-bit compensation buffer
    per parameter, in the optimizer state) and with ``update="nearest"``; and the extra bytes of fp32 norm
    running statistics."""
    row: dict[str, Any] = {"model": net, "optimizer": opt_name}
    variants = {"fp32": {}, "fp16": {"plugins": [PureHalfPrecision("float16")]},
                "bf16": {"plugins": [PureHalfPrecision("bfloat16")]},
                "bf16_kahan": {"plugins": [PureHalfPrecision("bfloat16", update="kahan")]},
                "bf16_nearest": {"plugins": [PureHalfPrecision("bfloat16", update="nearest")]}}
    for name, kwargs in variants.items():
        timer, trainer, model = fit_steps(net, OPTIMIZERS[opt_name], 1, 64, accelerator, sync, **kwargs)
        state = [t for s in trainer.optimizers[0].state.values() for t in s.values() if torch.is_tensor(t)]
        scalars = sum(t.nbytes for t in state if t.dim() == 0)  # Adam's step counters stay fp32 by design
        total = (sum(p.nbytes for p in model.parameters()) + timer.grad_bytes
                 + sum(t.nbytes for t in state if t.dim() > 0))
        row[f"{name}_bytes"] = total
        row[f"{name}_step_counter_bytes"] = scalars
        if name == "bf16":  # fp32 running mean/var instead of 16-bit ones (buffers, not in the total above)
            row["norm_stats_extra_bytes"] = stats_bytes(model) // 2
            # inside the step only: the fp32 stand-ins of the stepped params, their grads and their state
            row["step_transient_bytes"] = 2 * total
    for name in variants:
        row[f"{name}_ratio"] = row[f"{name}_bytes"] / row["fp32_bytes"]
    return row


def speed(net: str, rounds: int, steps: int, batch_size: int, accelerator: str,
          sync: Callable[[], None], stat: str = "min") -> dict[str, Any]:
    """Step time of every variant (min and median), interleaved; ratios of ``stat`` for the targets."""
    names = ["fp32", *variants("float16"), *variants("bfloat16")]
    times: dict[str, list[float]] = {n: [] for n in names}
    chosen: dict[str, list[str]] = {}
    for _ in range(rounds):
        all_variants = {"fp32": {"precision": "32-true"}, **variants("float16"), **variants("bfloat16")}
        for name, kwargs in all_variants.items():
            # auto: time only the steps after its own measured decision
            trial = trial_steps(kwargs, "cuda" if accelerator == "gpu" else "cpu")
            timer, trainer, _ = fit_steps(net, OPTIMIZERS["sgd"], steps + trial, batch_size, accelerator, sync,
                                          **kwargs)
            times[name].extend(timer.times[1 + trial:])  # the first step warms up
            if trial:
                chosen.setdefault(name, []).append(trainer.precision_plugin.compute_mode)
    ms_min = {n: min(t) * 1e3 for n, t in times.items()}
    ms_median = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    ms = ms_min if stat == "min" else ms_median
    row: dict[str, Any] = {"model": net, "batch_size": batch_size, "stat": stat, "step_ms": ms,
                           "step_ms_min": ms_min, "step_ms_median": ms_median, "auto_chose": chosen}
    for tag, lightning in (("fp16", "lightning 16-true"), ("bf16", "lightning bf16-true")):
        row[f"{tag}_native_vs_lightning"] = ms[f"{tag} native"] / ms[lightning]
        row[f"{tag}_auto_vs_fp32"] = ms[f"{tag} auto"] / ms["fp32"]
        row[f"{tag}_fp32_accumulate_vs_fp32"] = ms[f"{tag} fp32_accumulate"] / ms["fp32"]
    return row


def plain_speed(net: str, rounds: int, batch_size: int, device: torch.device) -> dict[str, Any]:
    """Best step time of a plain torch loop (no Lightning): fp32 vs each 16-bit dtype and compute mode."""
    from contextlib import nullcontext

    import torch.nn.functional as F

    from lp_lightning.models.nets import build_net
    from lp_lightning.precision.fp32_compute import Fp32Accumulate

    x = torch.randn(batch_size, 1, 8, 8, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    cases = {"fp32": (torch.float32, None), "fp16 fp32_accumulate": (torch.float16, "acc"),
             "bf16 native": (torch.bfloat16, None), "bf16 fp32_accumulate": (torch.bfloat16, "acc")}
    nets = {k: build_net(net, (1, 8, 8), 10, **NET_KWARGS[net]).to(device, dt) for k, (dt, _) in cases.items()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, foreach=False) for k, m in nets.items()}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, (dt, mode) in cases.items():
            start = time.perf_counter()
            with Fp32Accumulate(dt) if mode else nullcontext():
                F.cross_entropy(nets[k](x.to(dt)).float(), y).backward()
            opts[k].step()
            opts[k].zero_grad()
            times[k].append(time.perf_counter() - start)
    best = {k: min(v[1:]) * 1e3 for k, v in times.items()}
    return {"model": net, "best_ms": best, "vs_fp32": {k: v / best["fp32"] for k, v in best.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=sorted(NET_KWARGS))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per variant")
    parser.add_argument("--steps", type=int, default=4, help="training steps per round (first one not timed)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--stat", choices=["min", "median"], default="min",
                        help="step-time statistic of the ratios (min: robust on a shared, loaded machine)")
    parser.add_argument("--skip-speed", action="store_true", help="memory table only")
    parser.add_argument("--plain-rounds", type=int, default=0,
                        help="also time a plain torch loop (no Lightning) for this many interleaved rounds")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: at least 2 (the first step of each round warms up and is not timed)")
    if args.plain_rounds == 1 or args.plain_rounds < 0:
        parser.error(f"--plain-rounds {args.plain_rounds}: 0 (off) or at least 2 (the first round is not timed)")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    sync = torch.cuda.synchronize if accelerator == "gpu" else (lambda: None)
    auto = {d: compute_candidates("auto", getattr(torch, d), device)[0] for d in ("float16", "bfloat16")}
    info = {"device": torch.cuda.get_device_name() if accelerator == "gpu" else torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "auto": auto, "torch": torch.__version__}
    print(f"device={info['device']} threads={info['threads']} auto measures: fp16 {auto['float16']}, "
          f"bf16 {auto['bfloat16']}\n")

    mem = [memory(net, opt, accelerator, sync) for net in args.models for opt in OPTIMIZERS]
    print("| model | optimizer | fp32 bytes | fp16 bytes | bf16 bytes | fp16/fp32 | bf16/fp32 | bf16 kahan/fp32 "
          "| bf16 nearest/fp32 | fp32 norm stats, extra bytes | step transient bytes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in mem:
        print(f"| {r['model']} | {r['optimizer']} | {r['fp32_bytes']:,} | {r['fp16_bytes']:,} | {r['bf16_bytes']:,} "
              f"| {r['fp16_ratio']:.4f} | {r['bf16_ratio']:.4f} | {r['bf16_kahan_ratio']:.4f} "
              f"| {r['bf16_nearest_ratio']:.4f} | {r['norm_stats_extra_bytes']:,} | {r['step_transient_bytes']:,} |")
    counters = ", ".join(f"{r['model']} {r['fp16_step_counter_bytes']} B" for r in mem if r["fp16_step_counter_bytes"])
    print("(params + grads + optimizer state; Adam's step counters, 4-byte fp32 scalars in every precision, are "
          f"left out: {counters or 'none'}. fp16/bf16: the default update='auto' (fp16: kahan, bf16: "
          "stochastic); kahan adds a 16-bit "
          "compensation buffer per parameter. Norm stats: BatchNorm's fp32 running mean/var over 16-bit ones. "
          "Step transient: the fp32 stand-ins (params, grads, state) alive only inside optimizer.step)\n")
    result: dict[str, Any] = {"info": info, "memory": mem, "speed": []}
    if not args.skip_speed:
        for net in args.models:
            result["speed"].append(speed(net, args.rounds, args.steps, args.batch_size, accelerator, sync,
                                         args.stat))
        names = list(result["speed"][0]["step_ms"])
        for stat in ("min", "median"):
            print(f"Step time in ms ({stat}), batch {args.batch_size}, {args.rounds} interleaved rounds\n")
            print("| model | " + " | ".join(names) + " |")
            print("|---|" + "---:|" * len(names))
            for r in result["speed"]:
                print(f"| {r['model']} | " + " | ".join(f"{r[f'step_ms_{stat}'][n]:.1f}" for n in names) + " |")
            print()
        for r in result["speed"]:
            chose = ", ".join(f"{n} -> {sorted(set(c))}" for n, c in r["auto_chose"].items())
            print(f"{r['model']}: auto chose {chose}")
        print(f"\nRatios of the {args.stat} step times")
        keys = [k for k in result["speed"][0] if k.endswith(("_vs_lightning", "_vs_fp32"))]
        print("\n| model | " + " | ".join(keys) + " |")
        print("|---|" + "---:|" * len(keys))
        for r in result["speed"]:
            print(f"| {r['model']} | " + " | ".join(f"{r[k]:.3f}x" for k in keys) + " |")
    if args.plain_rounds:
        result["plain"] = [plain_speed(net, args.plain_rounds, args.batch_size, device) for net in args.models]
        names = list(result["plain"][0]["best_ms"])
        print(f"\nPlain torch loop, best of {args.plain_rounds} interleaved rounds, batch {args.batch_size}\n")
        print("| model | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
        for r in result["plain"]:
            print(f"| {r['model']} | " + " | ".join(f"{r['best_ms'][n]:.2f} ms ({r['vs_fp32'][n]:.2f}x)"
                                                   for n in names) + " |")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
