"""ToleranceAudit on a user's own modules and batches: dict and 3-tuple batches, a regression model refused."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lp_lightning.audit.tolerance import certificate, error, probabilities, tolerance
from lp_lightning.callbacks import ToleranceAudit
from lp_lightning.precision import PureHalfPrecision
from tests.user_pkg.data import DigitsRows
from tests.user_pkg.models import Regressor, RowTransformer, TinyResNet


def _trainer(root: Path, audit: ToleranceAudit, plugins: list | None = None, **kw) -> L.Trainer:
    return L.Trainer(max_epochs=1, accelerator="cpu", devices=1, default_root_dir=str(root), logger=False,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     plugins=plugins or [], callbacks=[audit], **{"limit_train_batches": 3, **kw})


def _val(dm: DigitsRows, key: str) -> torch.Tensor:
    dm.setup()
    return torch.stack([dm.sets["val"][i][key] for i in range(len(dm.sets["val"]))])


def test_dict_batches_bf16_report_matches_an_independent_oracle(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model, dm = RowTransformer(), DigitsRows(layout="dict")
    audit = ToleranceAudit(input_key="image", plot=False)
    _trainer(tmp_path, audit, plugins=[PureHalfPrecision("bfloat16", compute="native")]).fit(model, datamodule=dm)
    report = audit.last_report
    assert report is not None and audit.last_source == "captured"  # the loop's own logits, found by key
    assert report["low_precision"] == "PureHalfPrecision (bfloat16)" and report["reference_precision"] == "float32"

    x = _val(dm, "image")  # oracle: the trained bf16 model vs a float32 copy of its weights, on the whole val split
    model.eval()
    with torch.no_grad():
        low = model(x.to(torch.bfloat16)).double()
        ref = copy.deepcopy(model).float()(x).double()
    p_low, p_ref = probabilities(low), probabilities(ref)
    err, tol = error(p_low, p_ref), tolerance(p_ref)
    certified = certificate(tol, err)
    agree = low.argmax(1) == ref.argmax(1)
    assert report["n_samples"] == len(x) == 270 and report["nonfinite"] == 0
    assert report["agreement"] == pytest.approx(agree.double().mean().item())
    assert report["certified_fraction"] == pytest.approx(certified.double().mean().item())
    assert report["violations"] == int((certified & ~agree).sum()) == 0
    assert report["err_max"] == pytest.approx(err.max().item(), rel=1e-6) and report["err_max"] > 0
    assert report["tol_mean"] == pytest.approx(tol.mean().item(), rel=1e-6)
    assert 0 < report["certified_fraction"] <= report["agreement"] <= 1  # bf16 flips some low-margin samples


def test_triple_batches_read_by_position(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    audit = ToleranceAudit(reference="float64", plot=False)
    trainer = _trainer(tmp_path, audit, limit_val_batches=2)
    trainer.fit(TinyResNet(), datamodule=DigitsRows(layout="triple"))
    report = audit.last_report
    assert report is not None and audit.last_source == "captured"
    assert report["n_samples"] == 128 and report["violations"] == 0 and report["agreement"] == 1.0
    assert sorted(p.name for p in (tmp_path / "audit").iterdir()) == ["epoch_000.json"]


def _refused(tmp_path: Path, model: L.LightningModule, dm: L.LightningDataModule, audit: ToleranceAudit,
             match: str, sanity_steps: int = 0) -> None:
    before = copy.deepcopy(model.state_dict())
    trainer = _trainer(tmp_path, audit, num_sanity_val_steps=sanity_steps)
    with pytest.raises(ValueError, match=match) as info:
        trainer.fit(model, datamodule=dm)
    assert "\n" not in str(info.value) and "Lemma-1 audit certifies classification logits only" in str(info.value)
    assert trainer.global_step == 0 and audit.last_report is None  # refused before any optimizer step
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "audit").exists()


@pytest.mark.parametrize("sanity_steps", [0, 2], ids=["first_train_batch", "sanity_check"])
def test_regression_output_refused_before_the_first_step(tmp_path: Path, sanity_steps: int) -> None:
    split = "training" if sanity_steps == 0 else "validation"
    _refused(tmp_path, Regressor(), DigitsRows(layout="regression"), ToleranceAudit(), sanity_steps=sanity_steps,
             match=rf"^ToleranceAudit\(input_key='input', input_index=0\): Regressor returned a float32 tensor of "
                   rf"shape \(2, 1\) for the {split} batch's input \(a float32 tensor of shape \(2, 64\)\), "
                   r"not \(N, C\) classification logits with C >= 2.*"
                   r"set input_key / input_index.*remove ToleranceAudit.*regression")


class _Named(Dataset):
    """The dict rows plus a non-tensor field (a string: collated into a list)."""

    def __init__(self, rows: Dataset) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {**self.rows[i], "name": f"digit {i}"}


class _NamedRows(DigitsRows):
    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        self.setup()
        return DataLoader(_Named(self.sets[split]), batch_size=self.hparams.batch_size)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({}, r"input_key='input' is not a key of the batch dict; its keys are \['image', 'index', 'label', 'name'\]"),
    ({"input_key": "name"}, r"batch\['name'\] \(the input\) is a list, not a tensor"),
    ({"input_key": "label"}, r"RowTransformer's forward on the training batch's input "
                             r"\(an int64 tensor of shape \(2,\)\) raised RuntimeError"),
], ids=["wrong_key", "not_a_tensor", "labels_as_input"])
def test_unreadable_input_refused_at_the_first_batch(tmp_path: Path, kwargs: dict, match: str) -> None:
    _refused(tmp_path, RowTransformer(), _NamedRows(layout="dict"), ToleranceAudit(**kwargs), match=match)


def test_wrong_key_in_validation_batches_refused_at_the_sanity_check(tmp_path: Path) -> None:
    _refused(tmp_path, RowTransformer(), DigitsRows(layout="dict"), ToleranceAudit(), sanity_steps=1,
             match=r"cannot read the input of RowTransformer's validation batch: input_key='input'")


@pytest.mark.parametrize(("kwargs", "match"), [({"input_key": ""}, "input_key=''"),
                                               ({"input_index": -1}, "input_index=-1")])
def test_bad_batch_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ToleranceAudit(**kwargs)
