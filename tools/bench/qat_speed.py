"""QAT cost: training-step time of fake-quant (FakeQuantPrecision's layers) versus fp32, and versus torchao QAT.

    python -m lp_lightning.tools.bench.qat_speed [--nets mlp cnn --batch 256 --rounds 30 --epochs 10 --out r.json]

Speed: one step = forward + cross-entropy + backward + SGD step on a digits-shaped batch (1x8x8 images),
variants interleaved round by round in ONE process (medians per variant), so load on the machine hits every
variant alike; reported as ratios to fp32 (goal for int8: <= 1.5x). Variants:
  fp32       plain model
  fq_int8    ours, w8a8: int8 per-channel weights, int8 per-tensor static activations (moving-average observer)
  fq_int4w   ours, int4 weights per group of 32 (Linear) / per channel (Conv), int8 activations
  fq_int8_torch_ops  fq_int8 calling torch's fake-quantize kernels directly (``torch_fake_quant_ops()``)
  ao_int8    torchao ``quantize_(m, QATConfig(activation_config=int8 per-token asymmetric,
             weight_config=int8 per-channel symmetric, step="prepare"))`` (Linear only: MLP)
  ao_int4w   torchao, int4 weights per group of 32 + int8 per-token activations (MLP)
Accuracy (MLP): the same initial weights and batch order trained ``--epochs`` epochs with SGD on digits in
each variant; test accuracy of the fake-quant model (eval mode) is reported next to fp32's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lp_lightning.data import DigitsDataModule
from lp_lightning.io import write_json
from lp_lightning.models.nets import build_net
from lp_lightning.precision.fake_quant import FakeQuantPrecision
from lp_lightning.precision.fp8 import _quiet_torchao_import
from lp_lightning.quant import torch_fake_quant_ops

VARIANTS = ("fp32", "fq_int8", "fq_int4w", "fq_int8_torch_ops", "ao_int8", "ao_int4w")
TORCHAO_NETS = ("mlp",)  # torchao QAT swaps nn.Linear only


def torchao_qat(model: nn.Module, weight: str) -> nn.Module:
    """torchao QAT (prepare step) in place: int8 per-token asymmetric activations, int8/int4 symmetric weights."""
    with _quiet_torchao_import():
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    w = (IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True) if weight == "int8"
         else IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True))
    quantize_(model, QATConfig(activation_config=act, weight_config=w, step="prepare"))
    return model


def build(variant: str, net: str, base: nn.Module) -> nn.Module:
    """A copy of ``base`` prepared for ``variant`` (same initial weights for every variant)."""
    model = copy.deepcopy(base)
    if variant in ("fq_int8", "fq_int8_torch_ops"):
        FakeQuantPrecision("int8", "int8").convert_module(model)
    elif variant == "fq_int4w":
        skip = ["patch_embed"] if net == "vit" else []
        FakeQuantPrecision("int4", "int8", granularity="per_group", group_size=32, skip=skip).convert_module(model)
    elif variant.startswith("ao_"):
        model = torchao_qat(model, variant.removeprefix("ao_"))
    return model


def make_step(model: nn.Module, x: Tensor, y: Tensor, torch_ops: bool = False) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()

    def step() -> None:
        with torch_fake_quant_ops(torch_ops):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    return step


def time_steps(net: str, variants: list[str], batch: int, rounds: int,
               net_kwargs: dict | None = None) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per training step of each variant, interleaved round by round.

    On a shared machine a step is often preempted, which inflates wall time by whole scheduler time slices;
    the process CPU time (with ``--threads 1``) counts only the work done, so it is reported too.
    """
    torch.manual_seed(0)
    base = build_net(net, (1, 8, 8), 10, **(net_kwargs or {}))
    x, y = torch.randn(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
    steps = {v: make_step(build(v, net, base), x, y, v.endswith("torch_ops")) for v in variants}
    for step in steps.values():  # warm-up
        step()
        step()
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            cpu[v].append(time.process_time() - start_cpu)
            wall[v].append(time.perf_counter() - start)
    return {v: (statistics.median(wall[v]), statistics.median(cpu[v])) for v in variants}


def accuracy_after_training(net: str, variants: list[str], epochs: int, batch: int = 64) -> dict[str, float]:
    """Test accuracy on digits of each variant after ``epochs`` epochs with the same init and batch order."""
    dm = DigitsDataModule(batch_size=batch)
    dm.setup()
    (xtr, ytr), (xte, yte) = dm.dataset("train").tensors, dm.dataset("test").tensors
    torch.manual_seed(0)
    base = build_net(net, (1, 8, 8), 10)
    result = {}
    for v in variants:
        model = build(v, net, base)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(xtr), generator=gen).split(batch):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            result[v] = float((model(xte).argmax(1) == yte).float().mean())
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn", "vit"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--mlp-hidden", type=int, nargs="+", default=None,
                        help="hidden widths of the timed MLP (default: the mlp net's 256 256)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of the MLP accuracy comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings steady)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict = {"batch": args.batch, "rounds": args.rounds, "threads": args.threads, "speed": {}}
    print(f"{'net':5} {'variant':17} {'wall':>8} {'x fp32':>7} {'cpu':>8} {'x fp32':>7} "
          f"{'x torchao':>9} {'(cpu)':>9}   (median ms per step)")
    for net in args.nets:
        variants = [v for v in args.variants if not v.startswith("ao_") or net in TORCHAO_NETS]
        if "fp32" not in variants:
            variants.insert(0, "fp32")
        kwargs = {"hidden": args.mlp_hidden} if net == "mlp" and args.mlp_hidden else None
        timed = time_steps(net, variants, args.batch, args.rounds, kwargs)
        rows = {}
        for v, (t, t_cpu) in timed.items():
            ao = "ao_" + v.removeprefix("fq_").removesuffix("_torch_ops") if v.startswith("fq_") else None
            rows[v] = {"ms_per_step": 1e3 * t, "ratio_to_fp32": t / timed["fp32"][0],
                       "ratio_to_torchao": t / timed[ao][0] if ao in timed else None,
                       "cpu_ms_per_step": 1e3 * t_cpu, "cpu_ratio_to_fp32": t_cpu / timed["fp32"][1],
                       "cpu_ratio_to_torchao": t_cpu / timed[ao][1] if ao in timed else None}
            vs_ao = (f"{rows[v]['ratio_to_torchao']:9.2f} {rows[v]['cpu_ratio_to_torchao']:9.2f}" if ao in timed
                     else f"{'':19}")
            print(f"{net:5} {v:17} {1e3 * t:8.2f} {rows[v]['ratio_to_fp32']:7.2f} {1e3 * t_cpu:8.2f} "
                  f"{rows[v]['cpu_ratio_to_fp32']:7.2f} {vs_ao}", flush=True)
        report["speed"][net] = rows
    acc_variants = [v for v in args.variants if v != "fp32" and not v.endswith("torch_ops")]  # same numerics
    if args.epochs > 0:
        acc = accuracy_after_training("mlp", ["fp32", *acc_variants], args.epochs)
        report["accuracy_mlp"] = {"epochs": args.epochs, "test_acc": acc}
        print(f"MLP test accuracy after {args.epochs} epochs: "
              + ", ".join(f"{v} {a:.4f}" for v, a in acc.items()))
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
