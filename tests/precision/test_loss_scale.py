"""Loss scaling on 16-bit gradients: the scaler itself, clipping, accumulation, manual loops, checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lp_lightning.data import DigitsDataModule
from lp_lightning.models import Classifier
from lp_lightning.precision import PureHalfPrecision
from lp_lightning.precision.loss_scale import LossScaler
from tests.conftest import fit_classifier


def _grad_norm(module: torch.nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in module.parameters()])))


# ---------------------------------------------------------------- the scaler alone
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unscale_in_place_keeps_dtype_and_is_exact(dtype):
    p = torch.nn.Parameter(torch.zeros(64, dtype=dtype))
    true = torch.randn(64).to(dtype)
    p.grad = (true.float() * 1024).to(dtype)
    grad = p.grad
    assert not LossScaler(1024.0).unscale_([p])
    assert p.grad is grad and grad.dtype == dtype  # in place
    torch.testing.assert_close(grad, true, rtol=0, atol=0)  # power-of-two scale: exact


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_unscale_finds_nonfinite(bad):
    p, q = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16)), torch.nn.Parameter(torch.zeros(2))
    p.grad, q.grad = torch.tensor([1.0, bad, 2.0], dtype=torch.float16), torch.ones(2)
    assert LossScaler(8.0).unscale_([p, q])


def test_dynamic_update_backs_off_and_grows():
    s = LossScaler(1024.0, growth_interval=3)
    s.update(found_inf=True)
    assert s.scale == 512.0 and s.skipped_steps == 1
    for _ in range(2):
        s.update(found_inf=False)
    assert s.scale == 512.0
    s.update(found_inf=False)
    assert s.scale == 1024.0 and s.growth_tracker == 0
    static = LossScaler(64.0, dynamic=False)
    static.update(True)
    assert static.scale == 64.0 and static.skipped_steps == 1
    fresh = LossScaler()
    fresh.load_state_dict(s.state_dict())
    assert (fresh.scale, fresh.growth_tracker, fresh.skipped_steps) == (s.scale, s.growth_tracker, s.skipped_steps)


# ---------------------------------------------------------------- inside Lightning
class Recorder(Callback):
    """Scale before each batch, gradient norm after clipping, parameter snapshots."""

    def __init__(self) -> None:
        self.scales: list[float] = []
        self.grad_norms: list[float] = []
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.scales.append(trainer.precision_plugin.scaler.scale)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if all(p.grad is not None for p in pl_module.parameters()):
            self.grad_norms.append(_grad_norm(pl_module))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps += 1


def test_overflow_skips_step_and_backs_off(tmp_path):
    rec = Recorder()
    plugin = PureHalfPrecision("float16", loss_scale="dynamic", init_scale=2.0**24)  # scaled grads overflow
    model, trainer, _ = fit_classifier(tmp_path, epochs=1, plugins=[plugin], callbacks=[rec])
    assert plugin.scaler.skipped_steps >= 3 and plugin.scaler.scale < 2.0**24
    assert rec.scales[0] == 2.0**24 and rec.scales[1] == 2.0**23
    assert trainer.callback_metrics["loss_scale"] == plugin.scaler.scale  # logged
    assert trainer.callback_metrics["val/acc"] > 0.4  # learns once the scale has backed off (1 epoch)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_skipped_step_leaves_weights_unchanged(tmp_path):
    plugin = PureHalfPrecision("float16", loss_scale="dynamic", init_scale=2.0**40)
    L.seed_everything(0)
    model = Classifier(net="mlp", input_shape=[1, 8, 8], num_classes=10)
    before = {k: v.clone().half() for k, v in model.state_dict().items()}
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, plugins=[plugin], limit_val_batches=0)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    assert plugin.scaler.skipped_steps == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_sees_unscaled_gradients(tmp_path, algorithm):
    rec = Recorder()
    clip = 1e-2
    plugin = PureHalfPrecision("float16", loss_scale=2.0**12)
    model, _, _ = fit_classifier(tmp_path, epochs=1, plugins=[plugin], callbacks=[rec], limit_train_batches=4,
                                 limit_val_batches=0, gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    if algorithm == "norm":  # clipped after unscaling: the norm is the clip value, not clip / scale
        assert all(0.97 * clip < n < 1.01 * clip for n in rec.grad_norms), rec.grad_norms
    else:
        assert max(p.grad.abs().max() for p in model.parameters()) == pytest.approx(clip, rel=1e-3)


def test_accumulation_unscales_once_per_step(tmp_path):
    """Scaled accumulation gives the same weights as unscaled accumulation (same seed, same batches)."""
    results = []
    for loss_scale in (None, 2.0**10):
        rec = Recorder() if loss_scale else None
        model, _, _ = fit_classifier(tmp_path / str(loss_scale), epochs=1, limit_train_batches=6,
                                     limit_val_batches=0, accumulate_grad_batches=3,
                                     plugins=[PureHalfPrecision("float16", loss_scale=loss_scale)],
                                     callbacks=[rec] if rec else [])
        results.append([p.detach().float().clone() for p in model.parameters()])
        if rec:
            assert rec.steps == 2
            assert len(set(rec.scales)) == 1
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


class ManualClassifier(Classifier):
    """Manual optimization with clipping before the step (clipping must see unscaled gradients)."""

    def __init__(self, clip: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.clip = clip
        self.grad_norms: list[float] = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = F.cross_entropy(self(batch[0]).float(), batch[1])
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        self.grad_norms.append(_grad_norm(self))
        if self.steps_on(batch_idx):
            opt.step()
        return loss

    def steps_on(self, batch_idx: int) -> bool:
        return True


def test_manual_optimization(tmp_path):
    L.seed_everything(0)
    model = ManualClassifier(clip=1e-2, net="mlp", input_shape=[1, 8, 8], num_classes=10)
    plugin = PureHalfPrecision("float16", loss_scale="dynamic", init_scale=2.0**22)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=12, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        plugins=[plugin])
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    assert plugin.scaler.skipped_steps >= 1 and plugin.scaler.scale < 2.0**22
    finite = [n for n in model.grad_norms if n == n and n != float("inf")]
    assert finite and all(0.97e-2 < n < 1.01e-2 for n in finite), model.grad_norms
    assert trainer.callback_metrics["loss_scale"] == plugin.scaler.scale
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_scale_in_checkpoint_and_resumed(tmp_path):
    plugin = PureHalfPrecision("float16", loss_scale="dynamic", init_scale=2.0**40)
    _, _, ckpt = fit_classifier(tmp_path, epochs=1, plugins=[plugin], limit_train_batches=6, limit_val_batches=0)
    saved = torch.load(ckpt, weights_only=True)["PureHalfPrecision"]
    assert saved["scale"] == plugin.scaler.scale < 2.0**40
    assert saved["skipped_steps"] == plugin.scaler.skipped_steps > 0

    rec = Recorder()
    resumed = PureHalfPrecision("float16", loss_scale="dynamic")  # default init_scale 2**16
    L.seed_everything(0)
    model = Classifier(net="mlp", input_shape=[1, 8, 8], num_classes=10)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), plugins=[resumed], callbacks=[rec], limit_val_batches=0,
                        limit_train_batches=6)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64), ckpt_path=ckpt)
    assert rec.scales[0] == saved["scale"]
    assert resumed.scaler.skipped_steps >= saved["skipped_steps"]


class ClipThenSkipClassifier(ManualClassifier):
    """Manual loop that clips every batch but steps only on odd batches (a clip without a step)."""

    def steps_on(self, batch_idx: int) -> bool:
        return batch_idx % 2 == 1


def test_clip_without_step_does_not_leave_the_next_gradients_scaled(tmp_path):
    L.seed_everything(0)
    model = ClipThenSkipClassifier(clip=1e6, net="mlp", input_shape=[1, 8, 8], num_classes=10)
    plugin = PureHalfPrecision("float16", loss_scale=2.0**10)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=6, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        plugins=[plugin])
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    # every backward's gradients were unscaled before clipping (a no-op at this clip value): true norms of a
    # cross-entropy gradient are O(1), while still-scaled ones would be ~2**10 times larger
    assert len(model.grad_norms) == 6 and all(0 < n < 50 for n in model.grad_norms), model.grad_norms


def test_uncoalesced_sparse_gradients_are_unscaled_in_place():
    emb = torch.nn.Embedding(4, 3, sparse=True).half()
    emb(torch.tensor([1, 1, 2])).float().sum().mul(1024.0).backward()  # row 1 twice: an uncoalesced gradient
    assert not emb.weight.grad.is_coalesced()
    assert not LossScaler(init_scale=1024.0).unscale_([emb.weight])
    dense = emb.weight.grad.to_dense()
    assert dense.dtype == torch.float16
    assert torch.equal(dense[1], torch.full((3,), 2.0, dtype=torch.float16))
    assert torch.equal(dense[2], torch.ones(3, dtype=torch.float16)) and not dense[[0, 3]].any()


def test_norm_clipping_of_a_norm_beyond_fp16_clips_instead_of_zeroing():
    params = [torch.nn.Parameter(torch.zeros(100, 100, dtype=torch.float16)) for _ in range(2)]
    params[0].grad = torch.full((100, 100), 1000.0, dtype=torch.float16)  # norm 1e5: inf in fp16
    params[1].grad = torch.full((100, 100), -1.0, dtype=torch.float16)
    plugin = PureHalfPrecision("float16")
    plugin.clip_gradients(torch.optim.SGD(params, lr=0.1), clip_val=1.0)
    norm = torch.linalg.vector_norm(torch.cat([p.grad.float().flatten() for p in params]))
    assert norm.item() == pytest.approx(1.0, rel=1e-2) and params[1].grad.min() < 0
    small = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))]
    small[0].grad = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float16)
    before = small[0].grad.clone()
    plugin.clip_gradients(torch.optim.SGD(small, lr=0.1), clip_val=1.0)
    assert torch.equal(small[0].grad, before)  # below the bound: untouched


class _HalfLoss(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(8, 4)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])  # fp16 logits: an fp16 loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_16bit_loss_that_overflows_when_scaled_is_warned_about():
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 4, (64,)))
    plugin = PureHalfPrecision("float16", loss_scale=2.0**16, compute="native")
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accelerator="cpu", plugins=[plugin])
    with pytest.warns(UserWarning, match=r"loss is float16 and loss \* 65536 overflows.*fixed, so every step"):
        trainer.fit(_HalfLoss(), torch.utils.data.DataLoader(data, batch_size=32))
    assert plugin.scaler.skipped_steps == 2
