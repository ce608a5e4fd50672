"""FakeQuantPrecision: arguments, layer swaps, observer freezing, checkpoints, resume, audit protocol, DDP."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lp_lightning.config import precision_kwargs
from lp_lightning.data import DigitsDataModule
from lp_lightning.models import Classifier
from lp_lightning.models.checkpoint import load_classifier
from lp_lightning.precision import FakeQuantPrecision
from lp_lightning.quant import FakeQuantModule, convert, fake_quant_layers
from tests.conftest import compose_train, fit_classifier
from tests.ddp import run_ddp_script

FAST = {"limit_train_batches": 6, "limit_val_batches": 2}


def _model(net: str) -> Classifier:
    torch.manual_seed(0)
    return Classifier(net=net, input_shape=[1, 8, 8], num_classes=10)


def _observers(model: nn.Module) -> dict[str, tuple[float, float, bool]]:
    return {n: (float(m.act_observer.min_val), float(m.act_observer.max_val), m.act_observer.is_frozen)
            for n, m in fake_quant_layers(model).items() if m.act_observer is not None}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"weight": "int3"}, r"weight='int3'.*'int8', 'int4'"),
    ({"weight": "int16"}, r"weight='int16'"),
    ({"weight": 3}, r"weight=3"),
    ({"activation": "int4"}, r"activation='int4'"),
    ({"granularity": "per_tensor"}, r"granularity='per_tensor'.*per_channel"),
    ({"group_size": 0}, r"group_size=0"),
    ({"freeze_observers_after": 0}, r"freeze_observers_after=0"),
    ({"skip": "classifier"}, r"skip='classifier'"),
    ({"averaging_constant": 2.0}, r"averaging_constant=2.0"),
])
def test_bad_arguments_name_the_argument_and_value(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FakeQuantPrecision(**kwargs)


@pytest.mark.parametrize(("net", "skip", "expected"), [
    ("mlp", [], ["net.features.1", "net.features.4", "net.classifier"]),
    ("mlp", ["classifier"], ["net.features.1", "net.features.4"]),
    ("cnn", ["net.stem.0", "net.classifier"], ["net.stages.0.conv1", "net.stages.0.conv2", "net.stages.1.conv1",
                                               "net.stages.1.conv2", "net.stages.1.shortcut.0"]),
])
def test_convert_module_swaps_eligible_layers_in_place(net: str, skip: list[str], expected: list[str]) -> None:
    model = _model(net)
    params = list(model.parameters())
    plugin = FakeQuantPrecision(skip=skip)
    assert plugin.convert_module(model) is model
    assert plugin.converted_layers == expected and plugin.num_converted == len(expected)
    assert list(fake_quant_layers(model)) == expected
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))  # same Parameter objects
    assert plugin.convert_module(model) is model and plugin.converted_layers == expected  # idempotent


def test_no_quantizable_layer_is_an_error() -> None:
    with pytest.raises(ValueError, match="no quantizable layer"):
        FakeQuantPrecision().convert_module(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="no quantizable layer"):
        FakeQuantPrecision(skip=["*"]).convert_module(_model("mlp"))


def test_group_size_that_does_not_divide_a_layer_names_it() -> None:
    model = _model("vit")
    with pytest.raises(ValueError, match=r"'net\.patch_embed'.*group_size=32.*in_features=4"):
        FakeQuantPrecision(weight="int4", granularity="per_group").convert_module(model)
    assert not fake_quant_layers(model)
    n = FakeQuantPrecision(weight="int4", granularity="per_group", skip=["patch_embed"]).convert_module(model)
    assert n is model and len(fake_quant_layers(model)) == 9


def test_forward_context_restores_the_default_dtype_also_on_error() -> None:
    plugin = FakeQuantPrecision()
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.raises(RuntimeError, match="boom"), plugin.forward_context():
            assert torch.get_default_dtype() == torch.float32
            raise RuntimeError("boom")
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(torch.float32)
    assert plugin.compute_dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_module_is_a_new_plain_unquantized_copy(dtype: torch.dtype) -> None:
    model = _model("cnn")
    plugin = FakeQuantPrecision(weight="int4")
    plugin.convert_module(model)
    ref = plugin.reference_module(model, dtype)
    assert ref is not model and not any(isinstance(m, FakeQuantModule) for m in ref.modules())
    assert fake_quant_layers(model)  # original untouched
    w, w_ref = model.net.stages[0].conv1.weight, ref.net.stages[0].conv1.weight
    assert w_ref.dtype == dtype and torch.equal(w_ref.float(), w)  # original (not snapped) weights


@pytest.mark.parametrize(("net", "kwargs"), [
    ("mlp", {"weight": "int8"}),
    ("cnn", {"weight": "int4", "granularity": "per_group", "group_size": 16, "skip": ["net.stem.0"]}),
])
def test_checkpoint_round_trip_gives_the_same_predictions(tmp_path: Path, net: str, kwargs: dict[str, Any]) -> None:
    plugin = FakeQuantPrecision(freeze_observers_after=4, **kwargs)
    model, trainer, ckpt_path = fit_classifier(tmp_path, net=net, epochs=1, plugins=[plugin], **FAST)
    ckpt = torch.load(ckpt_path, weights_only=True)
    state = ckpt["FakeQuantPrecision"]
    assert state["config"]["weight"] == kwargs["weight"] and state["steps"] == trainer.global_step == 6
    assert any(k.endswith("act_observer.scale") for k in state["module_state"])  # beside the plain state dict
    assert not set(state["module_state"]) & set(ckpt["state_dict"])
    loaded, _ = load_classifier(ckpt_path)
    assert list(fake_quant_layers(loaded)) == plugin.converted_layers
    assert _observers(loaded) == _observers(model) and all(f for *_, f in _observers(loaded).values())
    x = torch.stack([DigitsDataModule().dataset("test")[i][0] for i in range(64)])
    torch.testing.assert_close(loaded.predict_logits(x), model.predict_logits(x))
    plain, qparams = convert(loaded)
    assert set(qparams) == set(plugin.converted_layers)
    assert (plain.predict_logits(x).argmax(1) == model.predict_logits(x).argmax(1)).float().mean() >= 0.9


class _FrozenLog(Callback):
    def __init__(self) -> None:
        self.history: list[tuple[int, bool]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        frozen = {f for *_, f in _observers(pl_module).values()}
        assert len(frozen) == 1
        self.history.append((trainer.global_step, frozen.pop()))


def test_observers_freeze_after_n_steps_also_across_a_resume(tmp_path: Path) -> None:
    dm = DigitsDataModule(batch_size=64)

    def trainer(plugin: FakeQuantPrecision, epochs: int, log: _FrozenLog) -> L.Trainer:
        return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                         plugins=[plugin], callbacks=[log], limit_train_batches=4, limit_val_batches=1)

    torch.manual_seed(0)
    first, log1 = FakeQuantPrecision(freeze_observers_after=6), _FrozenLog()
    t1 = trainer(first, 1, log1)
    model = Classifier(net="mlp", input_shape=[1, 8, 8], num_classes=10)
    t1.fit(model, datamodule=dm)
    assert log1.history == [(1, False), (2, False), (3, False), (4, False)]
    t1.save_checkpoint(tmp_path / "e1.ckpt")

    second, log2 = FakeQuantPrecision(freeze_observers_after=6), _FrozenLog()
    t2 = trainer(second, 3, log2)
    fresh = Classifier(net="mlp", input_shape=[1, 8, 8], num_classes=10)
    t2.fit(fresh, datamodule=dm, ckpt_path=tmp_path / "e1.ckpt")
    assert second.steps == t2.global_step == 12
    assert log2.history == [(s, s >= 6) for s in range(5, 13)]
    frozen_range = _observers(fresh)
    # once frozen, further training leaves the ranges alone
    third = copy.deepcopy(fresh).train()
    third(torch.randn(8, 1, 8, 8) * 50)
    assert _observers(third) == frozen_range


@pytest.mark.parametrize(("name", "weight", "granularity"), [("int8", "int8", "per_channel"),
                                                             ("int4w", "int4", "per_group")])
def test_hydra_configs_instantiate(name: str, weight: str, granularity: str) -> None:
    cfg = compose_train([f"precision={name}"])
    kwargs, plugins = precision_kwargs(cfg.precision)
    assert kwargs == {} and len(plugins) == 1
    plugin = plugins[0]
    assert isinstance(plugin, FakeQuantPrecision)
    assert plugin.config["weight"] == weight and plugin.config["granularity"] == granularity
    assert plugin.config["activation"] == "int8"
    json.dumps(plugin.state_dict())  # plain values only


DDP_BODY = """
import json, sys
from lp_lightning.precision import FakeQuantPrecision
from lp_lightning.quant import fake_quant_layers

if __name__ == "__main__":
    torch.manual_seed(0)
    model = Classifier(net="cnn", input_shape=[1, 8, 8], num_classes=10)
    plugin = FakeQuantPrecision(freeze_observers_after=3, skip=["net.stem.0"])
    seen = []  # every observer's range at the start of each training forward

    def record(module, args):
        if module.training:
            seen.append([[float(m.act_observer.min_val), float(m.act_observer.max_val)]
                         for m in fake_quant_layers(model).values()])

    model.net.register_forward_pre_hook(record)
    # gradient accumulation: DDP broadcasts buffers only before the forward that syncs gradients
    trainer = ddp_trainer(".", plugins=[plugin], limit_train_batches=10, limit_val_batches=2,
                          accumulate_grad_batches=2)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    trainer.save_checkpoint("ddp.ckpt")
    obs = {n: [float(m.act_observer.min_val), float(m.act_observer.max_val), m.act_observer.is_frozen]
           for n, m in fake_quant_layers(model).items()}
    bn = {n: [m.running_mean.tolist(), m.running_var.tolist()] for n, m in model.named_modules()
          if isinstance(m, torch.nn.BatchNorm2d)}
    recal = [c._done_at_step for c in trainer.callbacks if type(c).__name__ == "BatchNormRecalibration"]
    with open(f"obs_{trainer.global_rank}.json", "w") as f:
        json.dump({"steps": plugin.steps, "global_step": trainer.global_step, "obs": obs, "seen": seen,
                   "bn": bn, "recalibrated_at": recal}, f)
"""


@pytest.mark.slow  # two fresh interpreters under DDP: ~30-80 s on a busy 2-core machine
def test_ddp_training_keeps_observers_in_sync(tmp_path: Path) -> None:
    run_ddp_script(DDP_BODY, tmp_path)
    ranks = [json.loads((tmp_path / f"obs_{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["seen"]) == 10 and ranks[0]["seen"][1] != ranks[0]["seen"][0]  # the ranges do move
    assert ranks[0] == ranks[1]  # incl. the ranges every training forward started from
    assert ranks[0]["steps"] == ranks[0]["global_step"] == 5
    assert all(frozen for *_, frozen in ranks[0]["obs"].values())
    # BatchNorm re-estimated on every rank from the same unshuffled batches: equal statistics (compared above)
    assert ranks[0]["recalibrated_at"] == [5] and ranks[0]["bn"]
    assert all(any(v != 1.0 for v in var) for _, var in ranks[0]["bn"].values())
    loaded, _ = load_classifier(tmp_path / "ddp.ckpt")
    assert {n: list(v) for n, v in _observers(loaded).items()} == ranks[0]["obs"]
    assert {n: [m.running_mean.tolist(), m.running_var.tolist()] for n, m in loaded.named_modules()
            if isinstance(m, torch.nn.BatchNorm2d)} == ranks[0]["bn"]
