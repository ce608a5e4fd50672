"""LightningCLI drives every plugin and callback by ``class_path`` on a user's own module and DataModule, and
the configs and commands of docs/lightning_cli.md parse."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import yaml

from lp_lightning.quant import fake_quant_layers

pytest.importorskip("jsonargparse", minversion="4.27.7",
                    reason="LightningCLI needs jsonargparse[signatures]: pip install -e .[cli]")

DOC = Path(__file__).resolve().parents[1] / "docs" / "lightning_cli.md"
PRECISION = "lp_lightning.precision."
CALLBACK = "lp_lightning.callbacks."
ROWS = {"model": {"class_path": "tests.user_pkg.models.RowTransformer"},  # dict batches, Transformer encoder
        "data": {"class_path": "tests.user_pkg.data.DigitsRows", "init_args": {"layout": "dict"}}}
RESNET = {"model": {"class_path": "tests.user_pkg.models.TinyResNet"},  # (x, y, index) batches, convolutions
          "data": {"class_path": "tests.user_pkg.data.DigitsRows", "init_args": {"layout": "triple"}}}
FP16 = {"class_path": PRECISION + "PureHalfPrecision", "init_args": {"dtype": "float16", "loss_scale": "dynamic"}}


def lightning_cli(args: list[str] | dict[str, Any], run: bool = True) -> Any:
    from lightning.pytorch.cli import LightningCLI

    with mock.patch.object(sys, "argv", ["main.py"]):  # pytest's own arguments are not the CLI's
        return LightningCLI(args=args, run=run, save_config_kwargs={"overwrite": True})


def fit(root: Path, user: dict[str, Any], plugins: list[dict] | None = None,
        callbacks: list[dict] | None = None) -> Any:
    """``fit`` through LightningCLI with a config like a user's YAML file: 2 training batches, 1 validation batch
    (``limit_val_batches: 1`` would be all of them: the Trainer's ``float | int`` hint makes jsonargparse read 1.0)."""
    trainer = {"default_root_dir": str(root), "accelerator": "cpu", "devices": 1, "max_epochs": 1,
               "limit_train_batches": 2, "limit_val_batches": 0.25, "num_sanity_val_steps": 0,
               "enable_progress_bar": False, "enable_model_summary": False, "plugins": plugins, "callbacks": callbacks}
    cli = lightning_cli({"fit": {**user, "trainer": trainer}})
    assert cli.trainer.global_step == 2, "fit did not run its two optimizer steps"
    return cli


def check_attrs(obj: Any, expect: dict[str, Any]) -> None:
    """``expect``: dotted path (attributes or dict keys) -> value."""
    for path, value in expect.items():
        got = obj
        for part in path.split("."):
            got = got[part] if isinstance(got, dict) else getattr(got, part)
        assert got == value, f"{type(obj).__name__}.{path} = {got!r}, expected {value!r}"


# ------------------------------------------------------------------------------------------------- plugins
PLUGINS = [  # (class, init_args, user modules, attributes the plugin must have, parameter dtype, {layer: type})
    pytest.param("PureHalfPrecision", {"dtype": "bfloat16", "loss_scale": "dynamic", "compute": "auto"}, ROWS,
                 {"compute_dtype": torch.bfloat16, "compute": "auto", "scaler.dynamic": True},
                 torch.bfloat16, {}, id="pure-bf16"),
    pytest.param("PureHalfPrecision", {"dtype": "float16", "loss_scale": 1024.0, "compute": "fp32_accumulate",
                                       "growth_interval": 10}, RESNET,
                 {"compute_dtype": torch.float16, "compute": "fp32_accumulate", "scaler.dynamic": False,
                  "scaler.scale": 1024.0, "scaler.growth_interval": 10}, torch.float16, {}, id="pure-fp16-fixed-scale"),
    pytest.param("Float8Precision", {"recipe": "tensorwise", "emulate": True, "compute_dtype": "float32",
                                     "skip": ["head"]}, ROWS,
                 {"recipe": "tensorwise", "emulate": True, "compute_dtype": torch.float32, "skip": ["head"]},
                 torch.float32, {"encoder.layers.0.linear1": "Float8Linear", "head": "Linear"}, id="fp8-emulated"),
    pytest.param("FakeQuantPrecision", {"weight": "int8", "activation": "int8", "freeze_observers_after": 1,
                                        "skip": ["stem"]}, RESNET,
                 {"config.weight": "int8", "config.activation": "int8", "config.skip": ["stem"], "steps": 2,
                  "freeze_observers_after": 1}, torch.float32,
                 {"stem.0": "Conv2d", "blocks.0.dw": "FakeQuantConv2d", "fc": "FakeQuantLinear"}, id="int8-qat"),
    pytest.param("FakeQuantPrecision", {"weight": "int4", "activation": None, "granularity": "per_group",
                                        "group_size": 8}, ROWS,
                 {"config": {"weight": "int4", "activation": None, "granularity": "per_group", "group_size": 8,
                             "freeze_observers_after": None, "skip": [], "averaging_constant": 0.1,
                             "bn_recalibration": 16}},
                 torch.float32, {"embed": "FakeQuantLinear", "head": "FakeQuantLinear"}, id="int4-per-group"),
]


@pytest.mark.parametrize(("name", "init_args", "user", "expect", "param_dtype", "layers"), PLUGINS)
def test_plugin_by_class_path(tmp_path: Path, name: str, init_args: dict[str, Any], user: dict[str, Any],
                              expect: dict[str, Any], param_dtype: torch.dtype, layers: dict[str, str]) -> None:
    cli = fit(tmp_path, user, plugins=[{"class_path": PRECISION + name, "init_args": init_args}])
    plugin = cli.trainer.precision_plugin
    assert type(plugin).__name__ == name and type(plugin).__module__.startswith(PRECISION)
    check_attrs(plugin, expect)
    assert {p.dtype for p in cli.model.parameters()} == {param_dtype}
    assert {n: type(cli.model.get_submodule(n)).__name__ for n in layers} == layers
    if name == "FakeQuantPrecision":
        assert sorted(fake_quant_layers(cli.model)) == sorted(plugin.converted_layers)


# ----------------------------------------------------------------------------------------------- callbacks
CALLBACKS = [  # (class, init_args, user modules, plugins, attributes the callback must have, files it writes)
    pytest.param("ToleranceAudit", {"reference": "float64", "every_n_epochs": 1, "max_samples": 32, "plot": False,
                                    "input_index": 0}, RESNET, [FP16],
                 {"reference_dtype": torch.float64, "every_n_epochs": 1, "max_samples": 32, "plot": False,
                  "keys.input_index": 0, "last_report.n_samples": 32, "last_report.violations": 0},
                 ["audit/epoch_000.json"], id="tolerance-audit"),
    pytest.param("ToleranceAudit", {"input_key": "image", "max_samples": 32, "plot": True}, ROWS, [FP16],
                 {"keys.input_key": "image", "plot": True, "last_report.n_samples": 32},
                 ["audit/epoch_000.json", "audit/epoch_000.png"], id="tolerance-audit-dict-batches"),
    pytest.param("EpsilonGuard", {"action": "fix", "check_every_n_steps": 1, "thresholds": {"v_zero_share": 0.99}},
                 ROWS, [FP16], {"action": "fix", "check_every_n_steps": 1, "thresholds.v_zero_share": 0.99},
                 [], id="epsilon-guard"),
    pytest.param("NumericsMonitor", {"every_n_steps": 1, "modules": ["embed", "head"], "dtype": "float16",
                                     "heatmap": False}, ROWS, None,
                 {"every_n_steps": 1, "modules": ["embed", "head"], "dtype": "float16", "heatmap": False,
                  "layers": ["embed", "head"], "steps": [0, 1]}, ["numerics_summary.json"], id="numerics-monitor"),
]


@pytest.mark.parametrize(("name", "init_args", "user", "plugins", "expect", "files"), CALLBACKS)
def test_callback_by_class_path(tmp_path: Path, name: str, init_args: dict[str, Any], user: dict[str, Any],
                                plugins: list[dict] | None, expect: dict[str, Any], files: list[str]) -> None:
    cli = fit(tmp_path, user, plugins=plugins, callbacks=[{"class_path": CALLBACK + name, "init_args": init_args}])
    (callback,) = [c for c in cli.trainer.callbacks if type(c).__name__ == name]
    check_attrs(callback, expect)
    log_dir = Path(cli.trainer.log_dir)
    for file in files:
        assert (log_dir / file).is_file(), f"{name} did not write {file} into {log_dir}"
    if name == "ToleranceAudit":
        assert json.loads((log_dir / files[0]).read_text())["n_samples"] == 32
    if name == "EpsilonGuard":  # checked every param group before the first step, then watched every step
        assert callback.checks and [h["step"] for h in callback.history] == [1.0, 2.0]


# ---------------------------------------------------------------------------------------------------- docs
def doc_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def doc_configs() -> dict[str, str]:
    """The page's YAML blocks by the file name in their first line (``# bf16.yaml``)."""
    blocks = {}
    for block in doc_blocks("yaml"):
        name = re.fullmatch(r"# (\S+\.yaml)", block.splitlines()[0])
        assert name, f"a YAML block of {DOC.name} does not start with '# <file>.yaml': {block[:60]!r}"
        blocks[name.group(1)] = block
    return blocks


def doc_commands() -> list[str]:
    """The page's ``python main.py fit ...`` commands, continuation lines joined."""
    lines = "\n".join(doc_blocks("bash")).replace("\\\n", " ").splitlines()
    return [re.sub(r"\s+#.*", "", line) for line in lines if line.startswith("python main.py fit")]


def expected_classes(config: dict[str, Any]) -> tuple[set[str], set[str]]:
    trainer = config.get("trainer", {})
    return ({p["class_path"] for p in trainer.get("plugins", [])},
            {c["class_path"] for c in trainer.get("callbacks", [])})


def instantiated_classes(cli: Any) -> tuple[set[str], set[str]]:
    def path(obj: Any) -> str:
        return f"{type(obj).__module__.rsplit('.', 1)[0]}.{type(obj).__name__}"

    plugin = cli.trainer.precision_plugin
    plugins = {path(plugin)} if type(plugin).__module__.startswith(PRECISION) else set()
    return plugins, {path(c) for c in cli.trainer.callbacks if type(c).__module__.startswith(CALLBACK)}


def write_configs(root: Path) -> dict[str, Path]:
    paths = {}
    for name, block in doc_configs().items():
        paths[name] = root / name
        paths[name].write_text(block)
    return paths


@pytest.mark.parametrize("name", sorted(doc_configs()))
def test_docs_config_parses(tmp_path: Path, name: str) -> None:
    """Each YAML block instantiates through LightningCLI: complete ones alone, precision files over config.yaml."""
    paths = write_configs(tmp_path)
    config = yaml.safe_load(paths[name].read_text())
    stack = [paths[name]] if "model" in config else [paths["config.yaml"], paths[name]]
    args = [a for p in stack for a in ("--config", str(p))] + [f"--trainer.default_root_dir={tmp_path}"]
    cli = lightning_cli(args, run=False)
    plugins, callbacks = expected_classes(config)
    if "model" not in config and "callbacks" not in (config.get("trainer") or {}):  # a list replaces the base's
        callbacks |= expected_classes(yaml.safe_load(paths["config.yaml"].read_text()))[1]
    assert instantiated_classes(cli) == (plugins, callbacks)
    assert type(cli.model).__name__ == (config.get("model") or ROWS["model"])["class_path"].rsplit(".", 1)[1]


def test_docs_cover_every_plugin_and_callback() -> None:
    import lp_lightning.callbacks
    import lp_lightning.precision

    text = DOC.read_text()
    for module, prefix in ((lp_lightning.precision, PRECISION), (lp_lightning.callbacks, CALLBACK)):
        for name in module.__all__:
            if isinstance(getattr(module, name), type):
                assert f"class_path: {prefix}{name}" in text and f"={prefix}{name}" in text, name


@pytest.mark.parametrize("index", range(len(doc_commands())))
def test_docs_command_parses(tmp_path: Path, index: int) -> None:
    """Each ``python main.py fit ...`` command of the page instantiates (``fit`` and ``--print_config`` dropped)."""
    paths = write_configs(tmp_path)
    tokens = shlex.split(doc_commands()[index])[3:]
    args = [str(paths.get(t, t)) for t in tokens if t != "--print_config"]
    cli = lightning_cli([*args, f"--trainer.default_root_dir={tmp_path}"], run=False)
    files = [expected_classes(yaml.safe_load(paths[t].read_text())) for t in tokens if t in paths]
    plugins = {t.split("=", 1)[1] for t in tokens if t.startswith("--trainer.plugins=")} or next(
        (p for p, _ in reversed(files) if p), set())  # a later --config replaces the plugins list
    callbacks = {t.split("=", 1)[1] for t in tokens if t.startswith("--trainer.callbacks+=")}
    assert instantiated_classes(cli) == (plugins, callbacks.union(*(c for _, c in files)))


@pytest.mark.parametrize(("value", "scale"), [("1024", 1024.0), ("dynamic", 65536.0)])
def test_loss_scale_from_the_command_line(value: str, scale: float) -> None:
    """A number on the command line is a fixed scale, not the string '1024' (the hint tries float first)."""
    cli = lightning_cli(["--model=tests.user_pkg.models.TinyResNet", "--data=tests.user_pkg.data.DigitsRows",
                         "--trainer.plugins=lp_lightning.precision.PureHalfPrecision",
                         "--trainer.plugins.dtype=float16",
                         f"--trainer.plugins.loss_scale={value}", "--trainer.logger=false"], run=False)
    assert cli.trainer.precision_plugin.scaler.scale == scale
