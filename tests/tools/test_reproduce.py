"""The reproduction page regenerates end to end on a tiny budget and has every section."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from lp_lightning.tools.bench import reproduce


def test_quick_reproduction_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "docs"
    page = reproduce.main(["--quick", "--models", "mlp", "--precisions", "fp32", "fp16", "--epochs", "1",
                           "--seeds", "0", "--jobs", "1", "--out-dir", str(out)])
    text = page.read_text()
    for heading in ("## 1. Table 2", "## 2. Table 3", "## 3. Lemma 1", "## 4. Export", "## 5. Pure 16-bit",
                    "## 6. Pure 16-bit updates", "## 7. QAT fine-tuned"):
        assert heading in text
    assert "python -m lp_lightning.tools.bench.reproduce --quick" in text
    raw = json.loads((out / "reproduction.json").read_text())
    table2 = raw["results"]["table2"]["table"]["mlp"]
    assert set(table2) == {"fp32", "fp16"} and 0.0 < table2["fp16"]["acc_mean"] <= 100.0
    lemma = raw["results"]["lemma1"]["rows"][0]
    assert lemma["precision"] == "fp16" and lemma["violations"] == 0
    assert lemma["agreement"] >= lemma["certified_fraction"]
    assert (out / "img" / "lemma1_mlp_fp16.png").stat().st_size > 1000
    assert "lemma1_mlp_fp16.png" in text
    export_row = raw["results"]["export"]["rows"][0]
    assert export_row["model"] == "mlp" and export_row["int8_size_x"] < 1.0
    memory = raw["results"]["speed"]["memory"][0]
    assert memory["bf16_ratio"] == 0.5 and 0.5 < memory["fp16_ratio"] <= 0.75  # fp16's default update: kahan
    pure16 = raw["results"]["pure16"]["accuracy"]["mlp"]["sgd"]
    assert set(pure16) == {"fp32", "bf16 nearest", "bf16 default"} and all(len(v) == 1 for v in pure16.values())
    assert "| mlp | sgd |" in text and "bf16 default" in text
    finetune = raw["results"]["finetune"]["accuracy"]["mlp"]
    assert set(finetune) == {"fp32", "int8 scratch", "int8 finetune", "int4w scratch", "int4w finetune"}


def test_a_selection_without_cnn_or_mlp_has_no_lemma1_step() -> None:
    args = argparse.Namespace(quick=True, seeds=None, epochs=1, models=["vit"], precisions=["fp32", "fp16"], jobs=1)
    assert reproduce.plan(args)["lemma1"] == []
    assert reproduce.run_lemma1([], Path("img"), ["fp16"]) == {"rows": []}
    assert reproduce.run_lemma1(["--models", "mlp"], Path("img"), []) == {"rows": []}  # only fp32: nothing to audit


def test_the_page_goes_to_outputs_unless_write_docs() -> None:
    assert reproduce.parse_args(["--quick"]).out_dir == Path("outputs/reproduction")  # under the current directory
    assert reproduce.parse_args(["--quick", "--write-docs"]).out_dir == reproduce.REPO_DOCS
    assert Path(__file__).resolve().parents[2] / "docs" == reproduce.REPO_DOCS
    with pytest.raises(SystemExit):  # one or the other
        reproduce.parse_args(["--write-docs", "--out-dir", "x"])
