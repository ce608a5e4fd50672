"""Every config file composes and instantiates; bad choices and wrong types fail before training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from lightning.pytorch.plugins.precision import Precision
from omegaconf import OmegaConf

from lp_lightning.callbacks import EpsilonGuard
from lp_lightning.config import (
    build_callbacks,
    config_dir,
    lightning_precision,
    model_extras,
    precision_kwargs,
    validate,
)
from tests.conftest import compose_train
from tests.data.cifar_fixture import write_tiny_cifar

CONF = Path(config_dir())
GROUPS = ["precision", "model", "data", "optimizer", "trainer", "callbacks", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_composes_and_instantiates(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "cifar10"):
        overrides.append(f"data.data_dir={write_tiny_cifar(tmp_path)}")
    cfg = compose_train(overrides)
    validate(cfg)
    OmegaConf.to_container(cfg, resolve=True)
    dm = instantiate(cfg.data)
    model = instantiate(cfg.model, input_shape=list(dm.input_shape), num_classes=dm.num_classes,
                        optimizer=OmegaConf.to_container(cfg.optimizer), _convert_="all")
    assert model(dm.dataset("train").tensors[0][:2]).shape == (2, dm.num_classes)
    model.configure_optimizers()
    kwargs, plugins = precision_kwargs(cfg.precision)
    assert bool(kwargs) != bool(plugins) and all(isinstance(p, Precision) for p in plugins)
    build_callbacks(cfg.callbacks)
    trainer = instantiate(cfg.trainer, **kwargs, plugins=plugins, logger=False, default_root_dir=str(tmp_path))
    assert trainer.max_epochs >= 1


def test_lightning_precision_lists_allowed_modes() -> None:
    with pytest.raises(ValueError, match=r"precision='16-true-ish'.*32-true.*bf16-mixed"):
        lightning_precision("16-true-ish")
    assert precision_kwargs(compose_train(["precision=bf16_mixed"]).precision) == ({"precision": "bf16-mixed"}, [])


def test_wrong_value_type_names_the_key() -> None:
    cfg = compose_train(["trainer.max_epochs=abc"])
    with pytest.raises(ValueError, match=r"trainer.max_epochs='abc'.*expected int"):
        validate(cfg)
    with pytest.raises(ValueError, match=r"optimizer.lr='fast'"):
        validate(compose_train(["optimizer.lr=fast"]))


@pytest.mark.parametrize(("override", "group"), [("precision=fp17", "precision"), ("model=foo", "model")])
def test_unknown_group_option_lists_allowed_values(override: str, group: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lp_lightning.train", override, f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2  # bad input, as lp-train's own one-line errors
    assert f"Could not find '{group}/" in out and f"Available options in '{group}'" in out
    assert ("fp32" in out) if group == "precision" else ("cnn" in out and "vit" in out)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("overrides, want", [
    ([], [("raise", 0)]),
    (["callbacks=audit"], [("raise", 0)]),  # no guard entry of its own: the default one is added
    (["callbacks=safety"], [("raise", 50)]),
    (["callbacks=[safety,audit]"], [("raise", 50)]),  # the order of the entries does not matter
    (["callbacks=[audit,safety]"], [("raise", 50)]),
    (["callbacks.epsilon_guard.action=fix"], [("fix", 0)]),
    (["callbacks.epsilon_guard=null"], []),
    (["callbacks=audit", "+callbacks.epsilon_guard=null"], []),
    (["callbacks=audit", "+callbacks.epsilon_guard.action=fix"], [("fix", 0)]),  # arguments of the default guard
])
def test_every_callbacks_choice_has_one_epsilon_guard_unless_turned_off(overrides: list[str], want: list) -> None:
    guards = [c for c in build_callbacks(compose_train(overrides).callbacks) if isinstance(c, EpsilonGuard)]
    assert [(g.action, g.check_every_n_steps) for g in guards] == want


@pytest.mark.parametrize("override", ["+callbacks.foo.every_n_epochs=1", "+callbacks.foo=3"])
def test_a_callbacks_entry_without_target_is_an_error(override: str) -> None:
    with pytest.raises(ValueError, match=r"callbacks.foo has no _target_.*options: \['audit', 'default', 'safety'\]"):
        build_callbacks(compose_train([override]).callbacks)


@pytest.mark.parametrize(("overrides", "message"), [
    (["data=cifar10"], r"data.data_dir must be set"),
    (["data.val_fraction=abc"], r"data.val_fraction='abc' has type str; expected int or float"),
])
def test_missing_or_mistyped_data_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate(compose_train(overrides))
    validate(compose_train(["trainer.devices=[0]"]))  # Lightning's list form of devices is allowed


EXTRAS = {"input_shape": [1, 8, 8], "num_classes": 10, "optimizer": {"name": "sgd"}, "data": {"name": "digits"}}


@pytest.mark.parametrize(("model", "want"), [
    ({"_target_": "lp_lightning.models.Classifier", "net": "mlp"}, EXTRAS),  # the built-in takes them all
    ({"_target_": "lp_lightning.models.Classifier", "num_classes": 3}, {k: v for k, v in EXTRAS.items()
                                                                       if k != "num_classes"}),  # set: kept
    ({"_target_": "tests.user_pkg.models.TinyResNet", "width": 8}, {}),  # a user's model: its own arguments only
    # even when one has the same name as an extra (TinyResNet's optimizer is "sgd" | "adamw", not our group)
    ({"_target_": "tests.user_pkg.models.TinyResNet", "optimizer": "adamw"}, {}),
    ({"_target_": "tests.user_pkg.nope.Model"}, {}),  # does not import: instantiate says why
])
def test_model_extras_go_only_to_the_builtin_classifier(model: dict, want: dict) -> None:
    assert model_extras(OmegaConf.create(model), {**EXTRAS, "unused": None}) == want


def test_monitor_mode_must_be_max_or_min() -> None:
    validate(compose_train(["monitor=valid/mse", "monitor_mode=min"]))
    with pytest.raises(ValueError, match=r"^monitor_mode='maximum' is not allowed; choose one of \['max', 'min'\]$"):
        validate(compose_train(["monitor_mode=maximum"]))
