"""QAT robustness over seeds: fp32 vs int8/int4w QAT and their converted models, mean and worst seed.

    python -m tools.bench.qat_robustness [--models dscnn tinyresnet cnn --seeds 0 1 2 3 4 --epochs 12 --out r.json]
    python -m tools.bench.qat_robustness --quick      # dscnn, 2 seeds, 3 epochs: a smoke run (~1 min)
    python -m tools.bench.qat_robustness --models dscnn --set bn_recalibration=null   # an ablation

Each (model, seed) trains from scratch with Lightning (1 torch thread, CPU, seeded), once in fp32 and once per
QAT precision with the shipped ``conf/precision/{int8,int4w}.yaml`` (default settings: whatever callbacks the
plugin attaches itself are used; nothing else is added). Test accuracy (digits, the model's own split) of:
  fp32            the plain model
  <p>_qat         the fake-quant model in eval mode (the function QAT trained)
  <p>_converted   ``lp_lightning.quant.convert(model)[0]`` (plain layers, snapped weights, learned activation qparams)
  <p>_plain       ``convert(model, activations=False)[0]`` (no activation quantization), where supported
and ``<p>_agreement``, the top-1 agreement of the converted model with the QAT model. Models:
  dscnn       tests.user_pkg.models.DepthwiseSeparableCNN (Conv2d, depthwise, pointwise, BN, Conv1d, Linear)
  tinyresnet  tests.user_pkg.models.TinyResNet(width=16, blocks=2) (Conv+BN stem, depthwise residual blocks)
  cnn         the built-in Classifier(net="cnn") (lp-train's default optimizer)
Runs are sequential (nothing interleaved); only accuracy is measured, so the machine's load does not matter,
but the thread count does (results move with it): it is fixed to 1.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from lp_lightning.io import write_json
from lp_lightning.quant import convert

CONF = Path(__file__).resolve().parents[2] / "conf" / "precision"
MODELS = ("dscnn", "tinyresnet", "cnn")
PRECISIONS = ("int8", "int4w")


def build(model: str, seed: int) -> tuple[L.LightningModule, L.LightningDataModule]:
    """A fresh seeded module and its datamodule."""
    from tests.user_pkg.data import DigitsRows
    from tests.user_pkg.models import DepthwiseSeparableCNN, TinyResNet

    L.seed_everything(seed, verbose=False)
    if model == "dscnn":
        return DepthwiseSeparableCNN(), DigitsRows(layout="triple", seed=seed)
    if model == "tinyresnet":
        return TinyResNet(width=16, blocks=2), DigitsRows(layout="triple", seed=seed)
    if model == "cnn":
        from lp_lightning.data import DigitsDataModule
        from lp_lightning.models.classifier import Classifier

        return Classifier(net="cnn", input_shape=[1, 8, 8], num_classes=10), DigitsDataModule(seed=seed)
    raise ValueError(f"model={model!r} is unknown; allowed: {list(MODELS)}")


def plugin(precision: str, overrides: list[str] | None = None) -> Any:
    """The shipped precision config with ``overrides`` (``key=value``, YAML values), instantiated (None for fp32)."""
    if precision == "fp32":
        return None
    cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{precision}.yaml"), OmegaConf.from_dotlist(overrides or []))
    return instantiate(cfg)


def predictions(model: nn.Module, dm: L.LightningDataModule) -> tuple[Tensor, Tensor]:
    """Top-1 predictions and labels on the test split (eval mode, no grad)."""
    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for batch in dm.test_dataloader():
            x, y = batch[0], batch[1]
            preds.append(model(x).argmax(1))
            labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def train_one(model_name: str, seed: int, precision: str, epochs: int,
              overrides: list[str] | None = None) -> dict[str, float]:
    """Train one (model, seed, precision) and return its accuracies (and agreement for QAT)."""
    module, dm = build(model_name, seed)
    plug = plugin(precision, overrides)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        plugins=[plug] if plug else None, deterministic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm)
    dm.setup("test")
    pred, y = predictions(module, dm)
    if plug is None:
        return {"fp32": float((pred == y).float().mean())}
    out = {f"{precision}_qat": float((pred == y).float().mean())}
    converted, _ = convert(module)
    conv_pred, _ = predictions(converted, dm)
    out[f"{precision}_converted"] = float((conv_pred == y).float().mean())
    out[f"{precision}_agreement"] = float((conv_pred == pred).float().mean())
    try:
        plain, _ = convert(module, activations=False)  # type: ignore[call-arg]
    except TypeError:  # before activations= existed
        return out
    plain_pred, _ = predictions(plain, dm)
    out[f"{precision}_plain"] = float((plain_pred == y).float().mean())
    return out


def summarize(runs: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and worst seed of every column (worst = min, since every column is an accuracy or agreement)."""
    columns = sorted({k for r in runs.values() for k in r})
    return {c: {"mean": statistics.fmean(r[c] for r in runs.values() if c in r),
                "worst": min(r[c] for r in runs.values() if c in r)} for c in columns}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="dscnn, seeds 0 1, 3 epochs (smoke run)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="plugin overrides for an ablation, e.g. bn_recalibration=null averaging_constant=0.01")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.seeds, args.epochs = ["dscnn"], [0, 1], 3
    torch.set_num_threads(1)
    report: dict[str, Any] = {"epochs": args.epochs, "seeds": args.seeds, "threads": 1, "overrides": args.set,
                              "models": {}}
    for name in args.models:
        runs: dict[int, dict[str, float]] = {}
        for seed in args.seeds:
            start = time.perf_counter()
            runs[seed] = {}
            for precision in ("fp32", *args.precisions):
                runs[seed].update(train_one(name, seed, precision, args.epochs, args.set))
            cells = " ".join(f"{k}={v:.3f}" for k, v in runs[seed].items())
            print(f"{name} seed {seed} ({time.perf_counter() - start:.0f} s): {cells}", flush=True)
        summary = summarize(runs)
        report["models"][name] = {"runs": runs, "summary": summary}
        print(f"{name} over seeds {args.seeds}:", flush=True)
        for column, s in summary.items():
            print(f"  {column:18s} mean {s['mean']:.3f}  worst {s['worst']:.3f}", flush=True)
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
