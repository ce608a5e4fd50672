"""lp-train end to end: metrics.json with real numbers, checkpoints, reproducibility, atomic writes."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lp_lightning.audit.epsilon import UnsafeEpsilonError
from lp_lightning.io import write_json
from lp_lightning.models import CheckpointError, load_classifier
from lp_lightning.train import run
from tests.conftest import compose_train

QUICK = ["model=mlp", "trainer.max_epochs=2", "trainer.enable_progress_bar=false"]


def test_run_writes_metrics_checkpoints_and_config(tmp_path: Path) -> None:
    metrics = run(compose_train(QUICK), tmp_path, precision_name="fp32")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test_acc"] == metrics["test_acc"]
    for key in ("val_acc", "test_acc"):
        assert 0.5 < saved[key] <= 1.0  # two epochs of an MLP on digits is far above chance (0.1)
    for key in ("val_loss", "test_loss", "wall_time_s", "time_per_epoch_s"):
        assert saved[key] > 0
    assert saved["precision"] == "fp32" and saved["model"] == "mlp" and saved["epochs"] == 2
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert "max_epochs: 2" in (tmp_path / "config.yaml").read_text()
    model, _ = load_classifier(tmp_path / "checkpoints" / "best.ckpt")
    assert model.hparams.net == "mlp"
    # the Timer's state in best.ckpt is not added again when validate/test load it: the reported training
    # time is the one last.ckpt saved at the end of the last epoch (plus that epoch's last moments)
    saved_train = torch.load(saved["last_checkpoint"], weights_only=True)["callbacks"]["Timer"]["time_elapsed"]
    assert saved_train["train"] <= saved["time_per_epoch_s"] * saved["epochs"] <= 1.2 * saved_train["train"] + 0.02


@pytest.mark.parametrize("overrides, best_epoch", [
    (["optimizer.lr=0"], 0),  # val/acc never improves after epoch 0: Lightning's save_last would stay there
    (["+trainer.check_val_every_n_epoch=2"], 1),  # no validation after the last epoch
])
def test_last_checkpoint_is_the_last_epoch(tmp_path: Path, overrides: list[str], best_epoch: int) -> None:
    metrics = run(compose_train([*QUICK, "trainer.max_epochs=3", "+trainer.limit_train_batches=4", *overrides]),
                  tmp_path)
    last = torch.load(metrics["last_checkpoint"], weights_only=True)
    best = torch.load(metrics["best_checkpoint"], weights_only=True)
    assert Path(metrics["last_checkpoint"]).name == "last.ckpt"
    assert (last["epoch"], last["global_step"], best["epoch"]) == (2, 12, best_epoch)


def test_run_without_validation_tests_the_last_weights(tmp_path: Path) -> None:
    metrics = run(compose_train([*QUICK, "+trainer.limit_val_batches=0"]), tmp_path)
    assert metrics["best_checkpoint"] == "" and metrics["val_acc"] is None and 0.5 < metrics["test_acc"] <= 1.0
    assert Path(metrics["last_checkpoint"]).name == "last.ckpt"


def test_same_seed_same_weights(tmp_path: Path) -> None:
    a = run(compose_train([*QUICK, "seed=3"]), tmp_path / "a")
    b = run(compose_train([*QUICK, "seed=3"]), tmp_path / "b")
    wa = torch.load(a["last_checkpoint"], weights_only=True)["state_dict"]
    wb = torch.load(b["last_checkpoint"], weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_module_entry_point_runs_from_any_directory_and_reruns_in_place(tmp_path: Path) -> None:
    for _ in range(2):  # the second run into the same run dir replaces the first's files
        proc = subprocess.run([sys.executable, "-m", "lp_lightning.train", *QUICK, "trainer.max_epochs=1",
                               f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and Path(metrics["best_checkpoint"]).name == "best.ckpt"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert "`Trainer.fit` stopped: `max_epochs=1` reached." in (tmp_path / "run" / "train.log").read_text()


def test_a_failed_job_does_not_stop_the_sweep(tmp_path: Path) -> None:
    # optimizer=adam in pure fp16 stops at the eps guard; the sgd job still runs and the sweep reports failure
    proc = subprocess.run([sys.executable, "-m", "lp_lightning.train", "-m", *QUICK, "trainer.max_epochs=1",
                           "precision=fp16", "optimizer=adam,sgd", f"hydra.sweep.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0 and "UnsafeEpsilonError" in proc.stderr
    assert [json.loads(p.read_text())["precision"] for p in tmp_path.glob("*/metrics.json")] == ["fp16"]
    runs = json.loads((tmp_path / "sweep_summary.json").read_text())["runs"]  # written after each job
    assert [(r["status"], r["value"] is None) for r in runs] == [("failed", True), ("ok", False)]


def test_multirun_sweep_writes_one_run_per_value(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lp_lightning.train", "-m", *QUICK, "trainer.max_epochs=1",
                           "seed=1,2", f"hydra.sweep.dir={tmp_path}"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seeds = sorted(json.loads(p.read_text())["seed"] for p in tmp_path.glob("*/metrics.json"))
    assert seeds == [1, 2]
    # the summary: a table of the runs ending the output, the same rows as JSON and CSV in the sweep dir
    runs = json.loads((tmp_path / "sweep_summary.json").read_text())["runs"]
    assert [(r["job"], r["status"], r["metric"]) for r in runs] == [("0", "ok", "test/acc"), ("1", "ok", "test/acc")]
    assert "seed=1" in runs[0]["overrides"] and runs[1]["run_dir"] == str(tmp_path / "1")
    assert all(0.0 <= r["value"] <= 1.0 and r["time_s"] > 0 for r in runs)
    rows = list(csv.DictReader((tmp_path / "sweep_summary.csv").open()))
    assert [r["job"] for r in rows] == ["0", "1"] and float(rows[1]["value"]) == runs[1]["value"]
    out = proc.stdout.strip().splitlines()
    assert out[-4].startswith("job") and "test metric" in out[-4] and out[-1].endswith("sweep_summary.csv")
    assert re.match(rf"0 +seed=1 +test/acc=0\.\d{{4}} +\d+\.\ds +{tmp_path}/0$", out[-3]), out


VIT_FP16 = ["model=vit", "precision=fp16", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
            "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1"]


def test_default_guard_stops_pure_fp16_adam_with_lost_eps(tmp_path: Path) -> None:
    # the vit's AdamW eps=1e-8 is 0 in fp16: unguarded, lp-train model=vit precision=fp16 trained to chance level
    with pytest.raises(UnsafeEpsilonError, match=r"eps=1e-08 rounds to 0 in float16") as err:
        run(compose_train(VIT_FP16), tmp_path / "lost")
    assert not (tmp_path / "lost" / "metrics.json").exists()
    suggested = re.search(r"optimizer\.eps=([0-9.e-]+)\)", str(err.value)).group(1)
    assert float(suggested) >= 2.0**-12  # the suggested eps passes the guard
    assert run(compose_train([*VIT_FP16, f"optimizer.eps={suggested}"]), tmp_path / "safe")["epochs"] == 1
    assert run(compose_train([*VIT_FP16, "callbacks.epsilon_guard.action=fix"]), tmp_path / "fixed")["epochs"] == 1
    with pytest.raises(UnsafeEpsilonError):  # configs without their own guard get the default one
        run(compose_train([*VIT_FP16, "callbacks=audit"]), tmp_path / "audit")


def test_a_diverged_loss_is_written_as_null_in_standard_json(tmp_path: Path) -> None:
    def strict(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    path = write_json(tmp_path / "m.json", {"val_loss": float("nan"), "losses": [1.0, float("inf")], "ok": 0.5})
    assert json.loads(path.read_text(), parse_constant=strict) == {"val_loss": None, "losses": [1.0, None], "ok": 0.5}


def test_failed_write_keeps_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json(target, {"test_acc": 0.9})
    with pytest.raises(TypeError):
        write_json(target, {"test_acc": object()})  # not serializable: the write fails midway
    assert json.loads(target.read_text()) == {"test_acc": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # a new file's usual mode, not mkstemp's 0600


def test_lp_train_under_ddp_on_cpu(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lp_lightning.train", "trainer=ddp_cpu", *QUICK,
                           "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["test_acc"] > 0.2
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 10  # 1257 samples / (2 ranks x 64) = 10 steps per rank


def test_resume_continues_epochs_steps_and_loss_scale(tmp_path: Path) -> None:
    base = ["model=mlp", "precision=fp16", "precision.loss_scale=dynamic", "+precision.growth_interval=4",
            "trainer.enable_progress_bar=false", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1"]
    first = run(compose_train([*base, "trainer.max_epochs=1"]), tmp_path / "first")
    before = torch.load(first["last_checkpoint"], weights_only=True)
    resumed = run(compose_train([*base, "trainer.max_epochs=2", f"resume={first['last_checkpoint']}"]),
                  tmp_path / "resumed")
    after = torch.load(resumed["last_checkpoint"], weights_only=True)
    assert (before["global_step"], after["global_step"]) == (3, 6) and resumed["epochs"] == 2
    scale_before, scale_after = before["PureHalfPrecision"], after["PureHalfPrecision"]
    assert scale_before["skipped_steps"] == scale_after["skipped_steps"] == 0
    # the scale went on from the saved state: clean step 4 of growth_interval 4 doubled it (a fresh one would not)
    assert (scale_before["scale"], scale_before["growth_tracker"]) == (2.0**16, 3)
    assert (scale_after["scale"], scale_after["growth_tracker"]) == (2.0**17, 2)


def test_resume_from_a_missing_checkpoint_stops_before_training(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.ckpt' does not exist"):
        run(compose_train([*QUICK, f"resume={tmp_path / 'nope.ckpt'}"]), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    mlp = run(compose_train([*QUICK, "trainer.max_epochs=1"]), tmp_path / "mlp")
    with pytest.raises(CheckpointError, match=r"was trained as \{'net': 'mlp'.*this run builds \{'net': 'cnn'"):
        run(compose_train([*QUICK, "model=cnn", f"resume={mlp['last_checkpoint']}"]), tmp_path / "cnn")


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_resume_with_module_swapping_precisions(tmp_path: Path, precision: str) -> None:
    # the checkpoint holds fake-quant / FP8 layers that a fresh model gets only when the plugin converts it
    base = ["model=mlp", f"precision={precision}", "trainer.enable_progress_bar=false",
            "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1"]
    first = run(compose_train([*base, "trainer.max_epochs=1"]), tmp_path / "first")
    resumed = run(compose_train([*base, "trainer.max_epochs=2", f"resume={first['last_checkpoint']}"]),
                  tmp_path / "resumed")
    after = torch.load(resumed["last_checkpoint"], weights_only=True)
    assert after["global_step"] == 6 and resumed["epochs"] == 2


def test_resume_refuses_another_precision_structure_optimizer_or_no_epochs_left(tmp_path: Path) -> None:
    base = ["model=mlp", "trainer.enable_progress_bar=false", "+trainer.limit_train_batches=2",
            "+trainer.limit_val_batches=1"]
    int8 = run(compose_train([*base, "precision=int8", "trainer.max_epochs=1"]), tmp_path / "int8")["last_checkpoint"]
    cases = {  # what a resume of the int8 run gets wrong -> the message
        "precision=fp32": r"trained with FakeQuantPrecision \{'weight': 'int8'.*is without FakeQuantPrecision;",
        "precision=int4w": r"trained with FakeQuantPrecision \{'weight': 'int8'.*precision is with FakeQuantPrecision "
                           r"\{'weight': 'int4'",
        "optimizer=adam": r"trained with optimizer=sgd, this run uses optimizer=adam",
    }
    for override, message in cases.items():
        overrides = [*base, "precision=int8", override, "trainer.max_epochs=2", f"resume={int8}"]
        with pytest.raises(CheckpointError, match=message):
            run(compose_train(overrides), tmp_path / override.replace("=", "_"))
    with pytest.raises(CheckpointError, match=r"has trained 1 epoch\(s\) and trainer.max_epochs=1: nothing"):
        run(compose_train([*base, "precision=int8", "trainer.max_epochs=1", f"resume={int8}"]), tmp_path / "done")
    assert not any((tmp_path / d / "checkpoints").exists() for d in ("precision_fp32", "done"))


@pytest.mark.parametrize("override, message", [
    ("resume={tmp}/nope.ckpt", "checkpoint '{tmp}/nope.ckpt' does not exist"),
    # a plugin argument: Hydra wraps the plugin's ValueError; the key and the allowed values stay
    ("precision=fp16 precision.loss_scale=-1", "precision: loss_scale=-1 is not supported; allowed: None, 'dynamic'"),
    ("monitor_mode=maximum", "monitor_mode='maximum' is not allowed; choose one of ['max', 'min']"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, override: str, message: str) -> None:
    overrides = override.format(tmp=tmp_path).split()
    proc = subprocess.run([sys.executable, "-m", "lp_lightning.train", *QUICK, *overrides,
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 2
    assert f"lp-train: error: {message.format(tmp=tmp_path)}" in proc.stderr
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr
