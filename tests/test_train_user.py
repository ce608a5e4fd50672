"""lp-train on a user's own LightningModule and DataModule (tests/user_pkg) from a ``--config-dir`` of their own."""

from __future__ import annotations

import csv
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import get_class

from lp_lightning.models import CheckpointError, read_checkpoint
from lp_lightning.models.checkpoint import restore_structure
from lp_lightning.train import run
from tests.conftest import compose_train

ROOT = Path(__file__).resolve().parent.parent
# the user's group files: `_target_` and the user's own arguments only
USER_FILES = {
    "model/tiny.yaml": "_target_: tests.user_pkg.models.TinyResNet\nwidth: 8\nblocks: 1\n",
    "model/rows.yaml": "_target_: tests.user_pkg.models.RowTransformer\nd_model: 16\nn_heads: 2\n",
    "model/reg.yaml": "_target_: tests.user_pkg.models.Regressor\nhidden: 16\n",
    "data/triple.yaml": "_target_: tests.user_pkg.data.DigitsRows\nlayout: triple\n",
    "data/dict.yaml": "_target_: tests.user_pkg.data.DigitsRows\nlayout: dict\n",
    "data/regression.yaml": "_target_: tests.user_pkg.data.DigitsRows\nlayout: regression\n",
}
CASES = {  # name -> (model, data, monitor, mode)
    "resnet": ("tiny", "triple", "val_acc", "max"),
    "transformer": ("rows", "dict", "valid/accuracy", "max"),
    "regressor": ("reg", "regression", "valid/mse", "min"),
}
TINY = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2"]
BUILT_IN_EXTRAS = {"input_shape", "num_classes", "optimizer", "data"}


@pytest.fixture(scope="module")
def user_conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("myconf")
    for name, text in USER_FILES.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text(text)
    return root


def compose_user(conf: Path, case: str, *overrides: str) -> list[str]:
    model, data, monitor, mode = CASES[case]
    return [f"hydra.searchpath=[file://{conf}]", f"model={model}", f"data={data}", f"monitor={monitor}",
            f"monitor_mode={mode}", *TINY, *overrides]


def logged_test_metrics(run_dir: Path) -> dict[str, float]:
    """The test row the CSVLogger wrote during Trainer.test."""
    rows = list(csv.DictReader((run_dir / "logs" / "version_0" / "metrics.csv").open()))
    row = next(r for r in rows if any(k.startswith("test") and v for k, v in r.items()))
    return {k: float(v) for k, v in row.items() if k.startswith("test") and v}


def reload(path: Path, target: str):
    """Rebuild the user's module from its own saved hyperparameters (plus fake-quant layers) and load the weights."""
    ckpt = read_checkpoint(path)
    model = restore_structure(get_class(target)(**ckpt["hyper_parameters"]), ckpt)
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "fp16_mixed"])
@pytest.mark.parametrize("case", list(CASES))
def test_user_model_and_data_train_under_each_precision(user_conf: Path, tmp_path: Path, case: str,
                                                        precision: str) -> None:
    cfg = compose_train(compose_user(user_conf, case, f"precision={precision}"))
    metrics = run(cfg, tmp_path, precision_name=precision)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    target = cfg.model._target_
    assert (saved["model"], saved["data"], saved["precision"]) == (target, cfg.data._target_, precision)
    assert saved["test"] == metrics["test"] == logged_test_metrics(tmp_path)
    monitor = CASES[case][2]
    assert monitor in saved["val"] and set(saved["test"]) == {k.replace("valid", "test").replace("val", "test")
                                                              for k in saved["val"]}
    assert all(math.isfinite(v) for v in [*saved["val"].values(), *saved["test"].values(), saved["best_score"]])
    assert saved["test_acc"] is None and saved["val_acc"] is None  # the built-in Classifier's keys: not logged
    assert Path(saved["best_checkpoint"]) == tmp_path / "checkpoints" / "best.ckpt"
    assert saved["best_score"] == pytest.approx(saved["val"][monitor])  # one epoch: the best is the last
    model, ckpt = reload(Path(saved["last_checkpoint"]), target)
    hparams = dict(ckpt["hyper_parameters"])
    own = set(inspect.signature(type(model)).parameters)
    assert set(hparams) == own  # only the model's own arguments ...
    assert not isinstance(hparams.get("optimizer"), dict)  # ... not lp-train's optimizer group of that name
    assert not (BUILT_IN_EXTRAS - own) & set(hparams)
    assert ckpt["global_step"] == 3 and reload(tmp_path / "checkpoints" / "best.ckpt", target)


def test_a_monitor_the_model_never_logs_warns_and_tests_the_last_weights(user_conf: Path, tmp_path: Path) -> None:
    cfg = compose_train(compose_user(user_conf, "resnet", "monitor=val/acc"))  # TinyResNet logs val_acc
    with pytest.warns(UserWarning, match=r"monitor='val/acc' was not logged by TinyResNet \(logged: .*'val_acc'"):
        metrics = run(cfg, tmp_path)
    assert metrics["best_checkpoint"] == "" and metrics["best_score"] is None
    assert not (tmp_path / "checkpoints" / "best.ckpt").exists()
    assert Path(metrics["last_checkpoint"]).is_file() and math.isfinite(metrics["test"]["test_acc"])


def test_resume_compares_the_user_models_hyperparameters(user_conf: Path, tmp_path: Path) -> None:
    base = compose_user(user_conf, "resnet", "precision=int8")
    first = run(compose_train(base), tmp_path / "first")["last_checkpoint"]
    resumed = run(compose_train([*base, "trainer.max_epochs=2", f"resume={first}"]), tmp_path / "resumed")
    assert read_checkpoint(resumed["last_checkpoint"])["global_step"] == 6  # the fake-quant layers were rebuilt
    with pytest.raises(CheckpointError, match=r"was trained as \{.*'width': 8.*this run builds \{.*'width': 16"):
        run(compose_train([*base, "model.width=16", "trainer.max_epochs=2", f"resume={first}"]), tmp_path / "w16")
    with pytest.raises(CheckpointError, match=r"trained with FakeQuantPrecision .* is without FakeQuantPrecision"):
        run(compose_train([*base, "precision=fp32", "trainer.max_epochs=2", f"resume={first}"]), tmp_path / "fp32")
    assert not (tmp_path / "w16" / "checkpoints").exists()


def test_lp_train_with_a_config_dir_of_the_users_own(user_conf: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lp_lightning.train", "--config-dir", str(user_conf), "model=reg",
                           "data=regression", "precision=bf16", "monitor=valid/mse", "monitor_mode=min", *TINY,
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert f"test/mse={metrics['test']['test/mse']:.4f} valid/mse={metrics['best_score']:.4f}" in proc.stdout
    assert metrics["model"] == "tests.user_pkg.models.Regressor" and (tmp_path / "checkpoints" / "best.ckpt").is_file()
