"""Table 2: the ``experiment=table2`` sweep runs what ``tools/bench/table2.py`` runs, and tabulates back."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lp_lightning.config import compose_config, config_dir
from lp_lightning.tools.bench import table2

VIT = ["optimizer=adamw", "optimizer.eps=1e-3"]  # the vit line of conf/experiment/table2.yaml


@pytest.mark.parametrize("model", table2.MODELS)
def test_experiment_composes_the_benchmark_runs(model: str) -> None:
    extra = VIT if model == "vit" else []
    sweep = compose_config("train", ["experiment=table2", f"model={model}", "precision=fp16", "seed=3", *extra])
    bench = compose_config("train", table2.overrides(model, "fp16", 3, None))
    for key in ("model", "optimizer", "precision", "data", "seed"):
        assert sweep[key] == bench[key], key
    assert sweep.trainer.max_epochs == bench.trainer.max_epochs
    assert sweep.optimizer.name == ("adamw" if model == "vit" else "sgd")


def test_vit_with_sgd_composes_as_the_readme_says() -> None:
    sweep = compose_config("train", ["experiment=table2", "model=vit", "precision=bf16", "seed=1",
                                     "optimizer.lr=0.05", "+trainer.gradient_clip_val=1.0"])
    bench = compose_config("train", table2.overrides("vit", "bf16", 1, None, "sgd", 0.05, vit_clip=1.0))
    for key in ("model", "optimizer", "precision", "seed"):
        assert sweep[key] == bench[key], key
    assert sweep.optimizer.name == "sgd" and sweep.optimizer.lr == 0.05 and sweep.optimizer.momentum == 0.9
    assert sweep.trainer.gradient_clip_val == bench.trainer.gradient_clip_val == 1.0


def test_experiment_sweeps_the_papers_grid() -> None:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        hydra = compose("train", ["experiment=table2"], return_hydra_config=True).hydra
    params = {k: v.split(",") for k, v in hydra.sweeper.params.items()}
    assert params == {"precision": table2.PRECISIONS, "model": ["mlp", "cnn"], "seed": ["0", "1", "2", "3", "4"]}
    assert hydra.mode.name == "MULTIRUN" and hydra.sweep.dir == "outputs/table2"


def test_sweep_output_is_tabulated_without_training(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lp_lightning.train", "experiment=table2", "model=mlp",
                           "precision=fp32,fp16", "seed=0,1", "trainer.max_epochs=1",
                           "+trainer.limit_train_batches=3", f"hydra.sweep.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = table2.main(["--no-train", "--root", str(tmp_path), "--models", "mlp", "--precisions", "fp32", "fp16",
                         "--seeds", "0", "1", "--epochs", "1"])
    for precision in ("fp32", "fp16"):
        accs = [100 * json.loads((tmp_path / "mlp" / precision / f"seed{s}" / "metrics.json").read_text())["test_acc"]
                for s in (0, 1)]
        cell = table["mlp"][precision]
        assert cell["n_seeds"] == 2 and cell["epochs"] == 1
        assert cell["acc_mean"] == pytest.approx(statistics.fmean(accs))
        assert cell["acc_std"] == pytest.approx(statistics.stdev(accs))
    assert table["mlp"]["fp16"]["acc_diff_vs_fp32"] == pytest.approx(
        table["mlp"]["fp16"]["acc_mean"] - table["mlp"]["fp32"]["acc_mean"])


def test_finished_runs_with_other_settings_are_refused(tmp_path: Path) -> None:
    args = ["--root", str(tmp_path), "--models", "mlp", "--precisions", "fp32", "--seeds", "0"]
    table2.main([*args, "--epochs", "1"])  # trains one run
    assert table2.main([*args, "--epochs", "1", "--no-train"])["mlp"]["fp32"]["epochs"] == 1  # same settings: read
    with pytest.raises(SystemExit, match=r"1 finished run\(s\).*trained with other settings.*trainer.max_epochs "
                                         r"was 1, asked 3"):
        table2.main([*args, "--epochs", "3"])


def test_no_train_with_nothing_to_read_says_so_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit, match=r"^table2: no finished run under .* nothing to tabulate \(train them "
                                         r"without --no-train\)$"):
        table2.main(["--no-train", "--root", str(tmp_path), "--models", "mlp", "--precisions", "fp32", "--seeds", "0"])
    assert capsys.readouterr().out == ""  # no tables of dashes
