"""PureHalfPrecision: every stored tensor 16-bit, default dtype restored, bad input, Hydra entries."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lp_lightning.config import precision_kwargs
from lp_lightning.precision import PureHalfPrecision
from tests.conftest import compose_train, fit_classifier

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class GradDtypes(Callback):
    """Records the dtypes of the gradients the optimizer is about to use."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self.dtypes |= {p.grad.dtype for p in pl_module.parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("optimizer", [{"name": "sgd", "lr": 0.05, "momentum": 0.9},
                                       {"name": "adam", "lr": 1e-3, "eps": 1e-4}])
def test_everything_stored_is_16bit(tmp_path, dtype, optimizer):
    grads = GradDtypes()
    model, trainer, _ = fit_classifier(tmp_path, net="cnn", epochs=1, plugins=[PureHalfPrecision(dtype)],
                                       optimizer=optimizer, callbacks=[grads], limit_train_batches=2,
                                       limit_val_batches=0)
    want = DTYPES[dtype]
    assert {p.dtype for p in model.parameters()} == {want}
    stats = {n for n, _ in model.named_buffers() if n.endswith(("running_mean", "running_var"))}
    assert stats  # the cnn has BatchNorm: its running statistics stay fp32 (norm_stats="float32")
    assert {b.dtype for n, b in model.named_buffers() if n in stats} == {torch.float32}
    assert {b.dtype for n, b in model.named_buffers() if b.is_floating_point() and n not in stats} <= {want}
    assert grads.dtypes == {want}
    state = trainer.optimizers[0].state
    keys = {"sgd": ["momentum_buffer"], "adam": ["exp_avg", "exp_avg_sq"]}[optimizer["name"]]
    assert len(state) == len(list(model.parameters()))
    for key in keys:
        assert {s[key].dtype for s in state.values()} == {want}
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("dtype", ["float16", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_pure16_trains_mlp_to_fp32_accuracy(tmp_path, dtype):
    model, trainer, _ = fit_classifier(tmp_path, net="mlp", epochs=3, plugins=[PureHalfPrecision(dtype)])
    assert trainer.callback_metrics["val/acc"] > 0.83  # fp32 reaches 0.867 in this setting
    assert next(model.parameters()).dtype == DTYPES[dtype]


def test_default_dtype_restored_when_step_raises():
    plugin = PureHalfPrecision("bfloat16", compute="fp32_accumulate")
    with pytest.raises(RuntimeError, match="boom"), plugin.forward_context():
        assert torch.get_default_dtype() == torch.bfloat16
        assert torch.ones(1).dtype == torch.bfloat16
        raise RuntimeError("boom")
    assert torch.get_default_dtype() == torch.float32


def test_default_dtype_restored_when_training_step_raises(tmp_path):
    class Failing(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.training_step = _raise

    def _raise(*args, **kwargs):
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        fit_classifier(tmp_path, epochs=1, plugins=[PureHalfPrecision("float16")], callbacks=[Failing()],
                       limit_val_batches=0)
    assert torch.get_default_dtype() == torch.float32


def test_inputs_are_cast():
    plugin = PureHalfPrecision("bfloat16")
    x, y = plugin.convert_input((torch.randn(2, 3), torch.tensor([1, 2])))
    assert x.dtype == torch.bfloat16 and y.dtype == torch.int64
    assert plugin.precision == "bf16-true" and PureHalfPrecision("float16").precision == "16-true"
    assert plugin.compute_dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, arg", [
    ({"dtype": "float8"}, "dtype"), ({"dtype": "float32"}, "dtype"), ({"dtype": torch.float32}, "dtype"),
    ({"loss_scale": 0}, "loss_scale"), ({"loss_scale": -2.0}, "loss_scale"),
    ({"loss_scale": float("inf")}, "loss_scale"), ({"loss_scale": float("nan")}, "loss_scale"),
    ({"loss_scale": "static"}, "loss_scale"), ({"compute": "fast"}, "compute"),
    ({"loss_scale": "dynamic", "init_scale": 0.0}, "init_scale"),
    ({"loss_scale": "dynamic", "growth_interval": 0}, "growth_interval"),
    ({"growth_factor": 0.5}, "growth_factor"), ({"backoff_factor": 2.0}, "backoff_factor"),  # checked unused too
])
def test_bad_arguments_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg) as err:
        PureHalfPrecision(**kwargs)
    if arg == "dtype":
        assert "'bfloat16'" in str(err.value) and "'float16'" in str(err.value)  # lists the allowed values


def test_precision_and_plugin_together_is_lightnings_error():
    with pytest.raises(Exception, match="precision"):
        L.Trainer(precision="16-true", plugins=[PureHalfPrecision("float16")], logger=False)


@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_hydra_entries(name, dtype):
    kwargs, plugins = precision_kwargs(compose_train([f"precision={name}"]).precision)
    assert kwargs == {} and len(plugins) == 1
    plugin = plugins[0]
    assert isinstance(plugin, PureHalfPrecision) and plugin.compute_dtype == dtype
    assert plugin.scaler is None and plugin.compute == "auto"
    _, (scaled,) = precision_kwargs(compose_train([f"precision={name}", "precision.loss_scale=dynamic"]).precision)
    assert scaled.scaler is not None and scaled.scaler.dynamic
    _, (static,) = precision_kwargs(compose_train([f"precision={name}", "precision.loss_scale=1024"]).precision)
    assert static.scaler is not None and not static.scaler.dynamic and static.scaler.scale == 1024.0
