"""NumericsMonitor: module filters, exact statistics on a hand-built layer, files, hooks removed, DDP."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import matplotlib.image
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lp_lightning.callbacks import NumericsMonitor
from lp_lightning.callbacks.numerics_monitor import HEATMAP_FILE, SUMMARY_FILE, select_modules
from lp_lightning.data import DigitsDataModule
from lp_lightning.models import Classifier
from lp_lightning.precision import PureHalfPrecision
from tests.conftest import fit_classifier
from tests.ddp import run_ddp_script


def _cnn() -> Classifier:
    return Classifier(net="cnn", input_shape=[1, 8, 8], num_classes=10,
                      net_kwargs={"channels": [8, 16], "blocks_per_stage": 1})


def _hooks(model: nn.Module) -> int:
    """The monitor's hooks left on ``model`` (a precision plugin may keep its own, e.g. for fp32 norm stats)."""
    hooks = [h for m in model.modules() for d in (m._forward_hooks, m._backward_hooks, m._forward_pre_hooks)
             for h in d.values()]
    return sum(getattr(h, "__qualname__", "").startswith("NumericsMonitor.") for h in hooks)


def test_select_modules_by_name_type_and_class_name() -> None:
    model = _cnn()
    assert list(select_modules(model, "net.classifier")) == ["net.classifier"]
    assert list(select_modules(model, ["net.stem.*"])) == ["net.stem.0", "net.stem.1", "net.stem.2"]
    convs = select_modules(model, nn.Conv2d)
    assert convs == select_modules(model, "Conv2d") and len(convs) == 6
    default = select_modules(model, None)
    assert "net.classifier" in default and "net.stem.2" not in default  # ReLU has no parameters


@pytest.mark.parametrize("bad", ["classifier", "net.nothing.*", "Conv3d"])
def test_filter_matching_nothing_names_it(bad: str) -> None:
    with pytest.raises(ValueError, match=f"filter {bad!r} matches no module"):
        select_modules(_cnn(), ["net.classifier", bad])


def test_bad_filter_fails_at_fit_and_bad_args() -> None:
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[NumericsMonitor(modules=["net.fc9"])])
    with pytest.raises(ValueError, match="'net.fc9'"):
        trainer.fit(_cnn(), datamodule=DigitsDataModule(batch_size=32))
    with pytest.raises(ValueError, match="every_n_steps"):
        NumericsMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="dtype='int8'"):
        NumericsMonitor(dtype="int8")


class _Big(L.LightningModule):
    """One Linear with weights 1000 on inputs 10: outputs 4e4 (past fp16's max/2); loss gradient 1e-9."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.fill_(1000.0)
            self.fc.bias.zero_()

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.fc(batch[0]).sum() * 1e-9

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.full((8, 4), 10.0)), batch_size=4)


def test_exact_stats_against_fp16_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monitor = NumericsMonitor(every_n_steps=1, dtype="float16")
    model = _Big()
    trainer = L.Trainer(max_epochs=2, logger=CSVLogger(str(tmp_path)), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[monitor])
    trainer.fit(model)
    assert monitor.steps == [0, 1, 2, 3] and monitor.layers == ["fc"]
    row = monitor.summary()["fc"]
    assert row["act_amax"] == 4e4 and row["act_overflow_share"] == 1.0 and row["act_underflow_share"] == 0.0
    assert row["grad_amax"] == pytest.approx(1e-9) and row["grad_underflow_share"] == 1.0
    assert row["act_nonfinite"] == 0 and row["grad_nonfinite"] == 0
    assert "| fc |" in capsys.readouterr().out  # summary table printed at fit end
    log_dir = Path(trainer.log_dir)
    summary = json.loads((log_dir / SUMMARY_FILE).read_text())
    assert summary["steps"] == [0, 1, 2, 3] and summary["layers"]["fc"]["act_amax"] == 4e4
    image = matplotlib.image.imread(log_dir / HEATMAP_FILE)
    assert image.ndim == 3 and image.shape[0] > 50
    with open(log_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("numerics/fc/act_amax")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert all(float(r["numerics/fc/act_overflow_share"]) == 1.0 for r in rows)
    assert _hooks(model) == 0


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_pure_fp16_run_samples_every_n_steps_and_removes_hooks(tmp_path: Path, dtype: str | None) -> None:
    monitor = NumericsMonitor(every_n_steps=3, modules=["Conv2d", "net.classifier"], heatmap=dtype is None)
    model = _cnn()
    plugins = [PureHalfPrecision(dtype, compute="fp32_accumulate")] if dtype else []
    trainer = L.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, plugins=plugins,
                        default_root_dir=str(tmp_path), callbacks=[monitor])
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    assert monitor.steps == [0, 3] and len(monitor.layers) == 7
    data = torch.stack(monitor.records)
    assert not torch.isnan(data).any()  # every layer saw its activation and its gradient each sampled step
    assert (data[..., 3] > 0).all() and (data[..., 0] == 0).all()
    assert (tmp_path / HEATMAP_FILE).is_file() is (dtype is None)
    assert (tmp_path / SUMMARY_FILE).is_file()
    assert _hooks(model) == 0


class _Boom(L.Callback):
    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        raise RuntimeError("boom")


def test_hooks_removed_when_training_fails(tmp_path: Path) -> None:
    model = _cnn()
    monitor = NumericsMonitor(every_n_steps=1)
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), callbacks=[monitor, _Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    assert _hooks(model) == 0 and monitor._handles == []


def test_ddp_two_ranks_one_summary(tmp_path: Path) -> None:
    body = f"""
    from lightning.pytorch.loggers import CSVLogger
    from lp_lightning.callbacks import EpsilonGuard, NumericsMonitor
    if __name__ == "__main__":
        monitor = NumericsMonitor(every_n_steps=5, modules=["net.classifier"])
        guard = EpsilonGuard(action="fix", check_every_n_steps=5)
        model = Classifier(net="mlp", input_shape=[1, 8, 8], num_classes=10,
                           optimizer={{"name": "adam", "lr": 1e-3, "eps": 1e-8}})
        trainer = ddp_trainer({str(tmp_path)!r}, callbacks=[monitor, guard], logger=CSVLogger({str(tmp_path)!r}))
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
        assert sum(len(m._forward_hooks) for m in model.modules()) == 0
        print("RANK", trainer.global_rank, "STEPS", monitor.steps, "GUARD", len(guard.history), guard.checks[0].status)
    """
    proc = run_ddp_script(body, tmp_path)
    assert proc.stdout.count("STEPS [0, 5, 10, 15] GUARD 4 ok") == 2  # both ranks, no hang
    summaries = list(tmp_path.rglob(SUMMARY_FILE))
    assert len(summaries) == 1 and (summaries[0].parent / HEATMAP_FILE).is_file()
    assert json.loads(summaries[0].read_text())["layers"]["net.classifier"]["grad_nonfinite"] == 0


@pytest.mark.parametrize("plugin", ["fp8", "int8"])
def test_layers_swapped_by_a_precision_plugin_are_monitored(plugin: str, tmp_path: Path) -> None:
    from lp_lightning.precision import FakeQuantPrecision, Float8Precision

    precision = Float8Precision(emulate=True) if plugin == "fp8" else FakeQuantPrecision()
    monitor = NumericsMonitor(every_n_steps=1, modules=["net.features.1"], heatmap=False)
    fit_classifier(tmp_path, net="mlp", epochs=1, plugins=[precision], callbacks=[monitor],
                   limit_train_batches=2, limit_val_batches=1)
    layer = monitor.summary()["net.features.1"]
    assert layer["act_amax"] > 0 and layer["grad_amax"] > 0  # the hooks sat on the swapped layer


def test_heatmap_title_names_model_precision_and_epochs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lp_lightning.callbacks import numerics_monitor

    titles: list[str] = []
    write = numerics_monitor.write_heatmap
    monkeypatch.setattr(numerics_monitor, "write_heatmap",
                        lambda path, *args: (titles.append(args[-1]), write(path, *args))[1])
    fit_classifier(tmp_path, net="mlp", epochs=2, plugins=[PureHalfPrecision("bfloat16")],
                   callbacks=[NumericsMonitor(every_n_steps=5)], limit_train_batches=5)
    assert titles == ["mlp bf16, 2 epochs"]
    assert matplotlib.image.imread(tmp_path / HEATMAP_FILE).shape[0] > 100


def test_heatmap_figure_carries_the_given_title(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The figure's title is the run's (model, precision, epochs), not the last panel's name."""
    from matplotlib.figure import Figure

    from lp_lightning.callbacks.numerics_report import write_heatmap

    shown: list[str] = []
    suptitle = Figure.suptitle
    monkeypatch.setattr(Figure, "suptitle", lambda self, t, **kw: (shown.append(t), suptitle(self, t, **kw))[1])
    data = torch.rand(3, 2, 2, 4)  # steps x layers x (act, grad) x stats
    out = write_heatmap(tmp_path / "h.png", data, ["a", "b"], [0, 5, 10], "cnn int8, 3 epochs")
    assert shown == ["cnn int8, 3 epochs"] and out.is_file()
