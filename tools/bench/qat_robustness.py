"""QAT robustness over seeds, ours vs torch.ao: fp32, int8/int4w QAT, converted and INT8 ONNX, mean and worst seed.

    python -m lp_lightning.tools.bench.qat_robustness --models dscnn tinyresnet cnn --seeds 0 1 2 3 4 --out r.json
    python -m lp_lightning.tools.bench.qat_robustness --quick      # dscnn, 2 seeds, 3 epochs: a smoke run (~2 min)
    python -m lp_lightning.tools.bench.qat_robustness --models dscnn --set bn_recalibration=null   # an ablation

Each (model, seed) builds the module seeded, reseeds before every ``fit`` and trains it with Lightning (CPU,
``--threads`` torch threads, default 1) with the model's own optimizer, from scratch (``--epochs``, default: the
model's, 12; vit 25) in:
  fp32            the plain model
  int8, int4w     ours: the shipped ``conf/precision/{int8,int4w}.yaml`` (whatever callbacks the plugin attaches
                  itself are used, nothing else is added; ``--set`` overrides plugin arguments)
  ao              torch.ao: ``prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"))`` (Conv+BN folded,
                  fused moving-average observers), trained by the same LightningModule steps and optimizer
and fine-tuned: from the fp32 run's final weights, ``--ft-epochs`` (4) QAT epochs at 0.1x the learning rate (what
``lp-train precision=int8 init_from=...`` does) for int8, int4w and ao. Test accuracy (digits, the model's split):
  <p>_qat         the QAT model in eval mode (torch.ao: observers disabled)
  <p>_converted   ours: ``lp_lightning.quant.convert(model)[0]``; ao: ``convert_fx`` (x86/fbgemm int8 kernels)
  <p>_agreement   top-1 agreement of the converted model with the QAT model
  int8_onnx       the INT8 ONNX model of ``export_module`` on onnxruntime, and ``int8_onnx_agreement`` with QAT
Fine-tuned columns carry the prefix ``ft_``. Step time: forward + loss + backward + SGD step on one training batch,
fp32 / ours int8 / torch.ao, interleaved round by round in this process (median CPU time); ratios to fp32.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from lp_lightning.io import write_json
from lp_lightning.quant import convert
from lp_lightning.tools.bench.qat_table import markdown_table, misses, summarize

CONF = Path(__file__).resolve().parents[2] / "conf" / "precision"
MODELS = ("dscnn", "tinyresnet", "cnn", "vit")
PRECISIONS = ("int8", "int4w")
EPOCHS = {"dscnn": 12, "tinyresnet": 12, "cnn": 12, "vit": 25}
VIT = {"dim": 64, "depth": 2, "heads": 4, "mlp_ratio": 2}  # conf/model/vit.yaml


def build(model: str, seed: int, lr_scale: float = 1.0) -> tuple[L.LightningModule, L.LightningDataModule]:
    """A fresh seeded module (its learning rate times ``lr_scale``) and its datamodule."""
    from tests.user_pkg.data import DigitsRows
    from tests.user_pkg.models import DepthwiseSeparableCNN, TinyResNet

    L.seed_everything(seed, verbose=False)
    if model == "dscnn":
        return DepthwiseSeparableCNN(learning_rate=0.05 * lr_scale), DigitsRows(layout="triple", seed=seed)
    if model == "tinyresnet":
        return TinyResNet(width=16, blocks=2, learning_rate=0.05 * lr_scale), DigitsRows(layout="triple", seed=seed)
    if model in ("cnn", "vit"):
        from lp_lightning.data import DigitsDataModule
        from lp_lightning.models.classifier import Classifier

        if model == "cnn":  # lp-train's default optimizer, no schedule
            net = Classifier(net="cnn", input_shape=[1, 8, 8], num_classes=10,
                             optimizer={"name": "sgd", "lr": 0.05 * lr_scale, "momentum": 0.9})
        else:  # conf/model/vit.yaml with docs/pure16.md's AdamW (eps 1e-3) and cosine schedule
            net = Classifier(net="vit", input_shape=[1, 8, 8], num_classes=10, net_kwargs=VIT,
                             optimizer={"name": "adamw", "lr": 3e-3 * lr_scale, "eps": 1e-3, "weight_decay": 0.01},
                             scheduler={"name": "cosine"})
        return net, DigitsDataModule(seed=seed)
    raise ValueError(f"model={model!r} is unknown; allowed: {list(MODELS)}")


def plugin(precision: str, overrides: list[str] | None = None) -> Any:
    """The shipped precision config with ``overrides`` (``key=value``, YAML values), instantiated."""
    cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{precision}.yaml"), OmegaConf.from_dotlist(overrides or []))
    return instantiate(cfg)


def _ao_forward(self: nn.Module, x: Tensor) -> Tensor:
    return self.ao_graph(x)


@functools.cache
def _ao_class(cls: type) -> type:
    return type(f"AoQAT{cls.__name__}", (cls,), {"forward": _ao_forward})


def ao_prepare(module: L.LightningModule, example: Tensor) -> L.LightningModule:
    """torch.ao QAT in place: the module's forward becomes ``prepare_qat_fx``'s graph (x86 qconfig mapping); its
    steps, logging and optimizer stay its own (the layers with parameters move into ``module.ao_graph``)."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():  # torch.ao's deprecation notices
        warnings.simplefilter("ignore")
        graph = prepare_qat_fx(copy.deepcopy(module).train(), get_default_qat_qconfig_mapping("x86"), (example,))
    for name, sub in list(module.named_children()):
        if next(sub.parameters(), None) is not None:  # (parameter-free children such as metrics stay)
            delattr(module, name)
    module.ao_graph = graph
    module.__class__ = _ao_class(type(module))
    return module


def predictions(model: nn.Module, dm: L.LightningDataModule) -> tuple[Tensor, Tensor]:
    """Top-1 predictions and labels on the test split (eval mode, no grad)."""
    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for batch in dm.test_dataloader():
            preds.append(model(batch[0]).argmax(1))
            labels.append(batch[1])
    return torch.cat(preds), torch.cat(labels)


def first_batch(dm: L.LightningDataModule) -> tuple[Tensor, Tensor]:
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    return batch[0], batch[1]


def fit(module: L.LightningModule, dm: L.LightningDataModule, seed: int, epochs: int, plug: Any = None) -> None:
    L.seed_everything(seed, verbose=False)  # the same data order and dropout draws for every variant
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        plugins=[plug] if plug else None, deterministic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm)
    dm.setup("test")


def onnx_int8(module: L.LightningModule, dm: L.LightningDataModule) -> dict[str, float]:
    """Accuracy of the INT8 ONNX export of a fake-quant module and its agreement with the QAT model."""
    from lp_lightning.export.config import ExportConfig
    from lp_lightning.export.pipeline import export_module

    cfg = ExportConfig(formats=["fp32", "int8"], latency_batch_sizes=[1], warmup=1, iters=1, thresholds={})
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entry = export_module(module, dm, out, cfg, log=lambda *_: None)["formats"]["int8"]
    return {"onnx": float(entry["accuracy"]), "onnx_agreement": float(entry["agreement_fake_quant"])}


def qat_columns(prefix: str, module: L.LightningModule, dm: L.LightningDataModule, converted: nn.Module,
                onnx: bool) -> dict[str, float]:
    """``<prefix>_qat``, ``_converted``, ``_agreement`` (and ``_onnx``, ``_onnx_agreement``) of a trained module."""
    pred, y = predictions(module, dm)
    conv_pred, _ = predictions(converted, dm)
    out = {"qat": (pred == y).float().mean(), "converted": (conv_pred == y).float().mean(),
           "agreement": (conv_pred == pred).float().mean()}
    if onnx:
        out.update(onnx_int8(module, dm))
    return {f"{prefix}_{k}": float(v) for k, v in out.items()}


def train_qat(model_name: str, seed: int, variant: str, epochs: int, overrides: list[str], onnx: bool,
              init: Mapping[str, Tensor] | None = None) -> dict[str, float]:
    """One QAT run (``variant`` int8, int4w or ao) from scratch, or fine-tuned from ``init`` at 0.1x the lr."""
    module, dm = build(model_name, seed, 1.0 if init is None else 0.1)
    if init is not None:
        module.load_state_dict(init)
    prefix = variant if init is None else f"ft_{variant}"
    if variant == "ao":
        torch.backends.quantized.engine = "x86"
        from torch.ao.quantization import disable_observer
        from torch.ao.quantization.quantize_fx import convert_fx

        ao_prepare(module, first_batch(dm)[0])
        fit(module, dm, seed, epochs)
        module.ao_graph.apply(disable_observer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = convert_fx(copy.deepcopy(module.ao_graph).eval())
        deterministic = torch.are_deterministic_algorithms_enabled()  # Trainer(deterministic=True) left it on
        torch.use_deterministic_algorithms(False)  # quantized kernels resize outputs, which has no such mode
        try:
            return qat_columns(prefix, module, dm, converted, False)
        finally:
            torch.use_deterministic_algorithms(deterministic)
    fit(module, dm, seed, epochs, plugin(variant, overrides))
    return qat_columns(prefix, module, dm, convert(module)[0], onnx and variant == "int8")


def step_times(model_name: str, overrides: list[str], rounds: int) -> dict[str, float]:
    """Median CPU seconds of one training step (forward, cross-entropy, backward, SGD) of fp32, ours int8 and
    torch.ao on one training batch, interleaved round by round, as ratios to fp32 (and fp32's milliseconds)."""
    base, dm = build(model_name, 0)
    x, y = first_batch(dm)
    ours = copy.deepcopy(base)
    plugin("int8", overrides).convert_module(ours)
    models = {"fp32": base, "int8": ours, "ao": ao_prepare(copy.deepcopy(base), x)}
    steps: dict[str, Callable[[], None]] = {}
    for name, m in models.items():
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
        m.train()

        def step(m: nn.Module = m, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()

        steps[name] = step
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds + 2):  # two warm-up rounds
        for name, step in steps.items():
            start = time.process_time()
            step()
            if r >= 2:
                cpu[name].append(time.process_time() - start)
    med = {name: statistics.median(t) for name, t in cpu.items()}
    return {"fp32_ms": 1e3 * med["fp32"], "int8_ratio": med["int8"] / med["fp32"], "ao_ratio": med["ao"] / med["fp32"]}


def run_seed(name: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Every column of one (model, seed): fp32, then each QAT variant from scratch and fine-tuned."""
    epochs = args.epochs or EPOCHS[name]
    module, dm = build(name, seed)
    fit(module, dm, seed, epochs)
    pred, y = predictions(module, dm)
    row = {"fp32": float((pred == y).float().mean())}
    init = copy.deepcopy(module.state_dict())
    for variant in (*args.precisions, "ao"):
        row.update(train_qat(name, seed, variant, epochs, args.set, args.onnx))
        if args.ft_epochs:
            row.update(train_qat(name, seed, variant, args.ft_epochs, args.set, args.onnx, init))
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS[:3]), choices=MODELS)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=None, help="from-scratch epochs (default: 12; vit 25)")
    parser.add_argument("--ft-epochs", type=int, default=4, help="fine-tuning epochs at 0.1x the lr (0: none)")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the INT8 ONNX export")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved step-timing rounds (0: no timing)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results move with it)")
    parser.add_argument("--quick", action="store_true", help="dscnn, seeds 0 1, 3 epochs, 1 fine-tune epoch")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="plugin overrides for an ablation, e.g. bn_recalibration=null averaging_constant=0.01")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.seeds, args.epochs, args.ft_epochs, args.rounds = ["dscnn"], [0, 1], 3, 1, 5
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    report: dict[str, Any] = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                              "threads": args.threads, "epochs": args.epochs, "ft_epochs": args.ft_epochs,
                              "seeds": args.seeds, "overrides": args.set, "models": {}}
    for name in args.models:
        result: dict[str, Any] = {"runs": {}}
        report["models"][name] = result
        if args.rounds:
            result["speed"] = step_times(name, args.set, args.rounds)
            print(f"{name} step time: {result['speed']}", flush=True)
        for seed in args.seeds:
            start = time.perf_counter()
            result["runs"][seed] = run_seed(name, seed, args)
            cells = " ".join(f"{k}={v:.3f}" for k, v in result["runs"][seed].items())
            print(f"{name} seed {seed} ({time.perf_counter() - start:.0f} s): {cells}", flush=True)
            result["summary"] = summarize(result["runs"])
            if args.out:  # after every seed, so a cut-off sweep keeps what finished
                write_json(args.out, report)
    print(f"\nTest accuracy, mean / worst over seeds {args.seeds}, {args.threads} thread(s), {report['date']}:\n")
    print(markdown_table(report["models"]))
    report["misses"] = misses(report["models"])
    print("\nMissed bars:" if report["misses"] else "\nEvery bar met.", *report["misses"], sep="\n  ")
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
