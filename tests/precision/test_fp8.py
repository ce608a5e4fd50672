"""Float8Precision: layer swaps, skip, FP8 numerics, checkpoints and resume, bad input, Hydra, audit."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from lp_lightning.data import DigitsDataModule
from lp_lightning.models import Classifier, load_classifier, read_checkpoint
from lp_lightning.precision import Float8Precision
from lp_lightning.precision import fp8 as fp8_module
from tests.conftest import compose_train, fit_classifier

HAS_FP8 = fp8_module.fp8_hardware_missing() is None
MLP_FP8 = ["net.features.1", "net.features.4"]
FAST = {"limit_train_batches": 12, "limit_val_batches": 2}
VIT_FP8 = [f"net.blocks.{b}.{name}" for b in range(2) for name in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]


def _classifier(net: str) -> Classifier:
    torch.manual_seed(0)
    return Classifier(net=net, input_shape=[1, 8, 8], num_classes=10)


def _fp8_names(module: nn.Module) -> list[str]:
    from torchao.float8.float8_linear import Float8Linear

    return [name for name, m in module.named_modules() if isinstance(m, Float8Linear)]


def _fp8_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "Float8Precision keeps" in str(w.message)]


@pytest.mark.parametrize(("net", "expected", "odd"), [("mlp", MLP_FP8, []), ("vit", VIT_FP8, ["net.patch_embed"])])
def test_converts_eligible_linears_and_warns_once_for_odd_shapes(net: str, expected: list[str], odd: list[str]) -> None:
    plugin = Float8Precision(emulate=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = plugin.convert_module(_classifier(net))
    assert _fp8_names(model) == expected
    assert plugin.converted_layers == expected and plugin.num_converted == len(expected)
    assert plugin.skipped_layers["net.classifier"] == "skip"  # the head stays in high precision by default
    messages = _fp8_warnings(record)
    assert len(messages) == (1 if odd else 0)
    assert all(name in messages[0] for name in odd)
    assert {p.dtype for p in model.parameters()} == {plugin.compute_dtype}
    layers = dict(model.named_modules())
    again = plugin.convert_module(model)  # a later trainer.test() on the same Trainer converts again
    assert all(layers[name] is m for name, m in again.named_modules()) and plugin.converted_layers == expected


@pytest.mark.parametrize(("skip", "expected"), [(["net.features.1"], ["net.features.4"]),
                                                (["features.4", "classifier"], ["net.features.1"]),
                                                ([], MLP_FP8)])
def test_skip_takes_qualified_names(skip: list[str], expected: list[str]) -> None:
    plugin = Float8Precision(emulate=True, skip=skip)
    model = plugin.convert_module(_classifier("mlp"))
    assert _fp8_names(model) == expected
    # skip=[] does not force the 256->10 head into FP8: its shape is not divisible by 16
    assert "net.classifier" in plugin.skipped_layers


def test_skip_entry_matching_nothing_warns() -> None:
    with pytest.warns(UserWarning, match="net.nothing"):
        Float8Precision(emulate=True, skip=["net.nothing"]).convert_module(_classifier("mlp"))


def test_skipping_a_block_keeps_every_linear_inside_it() -> None:
    plugin = Float8Precision(emulate=True, skip=["net.blocks.0"])
    model = plugin.convert_module(_classifier("vit"))
    assert _fp8_names(model) == [n for n in VIT_FP8 if n.startswith("net.blocks.1.")]
    assert all(plugin.skipped_layers[n] == "skip" for n in VIT_FP8 if n.startswith("net.blocks.0."))


class _AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.proj = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attn(x, x, x, need_weights=False)[0])


def test_linear_inside_multihead_attention_is_kept_and_says_why() -> None:
    plugin = Float8Precision(emulate=True, skip=[])
    model = plugin.convert_module(_AttentionNet())
    assert _fp8_names(model) == ["proj"] and plugin.converted_layers == ["proj"]
    assert "MultiheadAttention" in plugin.skipped_layers["attn.out_proj"]
    with pytest.raises(ValueError, match="no nn.Linear layer to train in FP8"):  # out_proj alone: FP8 changes nothing
        Float8Precision(emulate=True, skip=["proj"]).convert_module(_AttentionNet())


def test_converting_again_with_another_recipe_is_an_error() -> None:
    model = Float8Precision(emulate=True).convert_module(_classifier("mlp"))
    assert _fp8_names(Float8Precision(emulate=True).convert_module(model)) == MLP_FP8  # same recipe: kept
    with pytest.raises(ValueError, match=r"layer 'net.features.1' is already an FP8 Linear whose config differs"):
        Float8Precision(recipe="rowwise", emulate=True).convert_module(model)


def test_model_without_eligible_linear_is_an_error() -> None:
    with pytest.raises(ValueError, match="no nn.Linear layer to train in FP8"):
        Float8Precision(emulate=True).convert_module(_classifier("cnn"))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"recipe": "blockwise"}, r"recipe='blockwise'.*\['tensorwise', 'rowwise', 'rowwise_with_gw_hp'\]"),
    ({"compute_dtype": "float16"}, r"compute_dtype='float16'.*'bfloat16', 'float32', 'auto'"),
    ({"emulate": "yes"}, r"emulate='yes'"),
    ({"skip": "classifier"}, r"skip='classifier'"),
])
def test_bad_arguments_name_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Float8Precision(**kwargs)


def test_missing_torchao_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # makes `import torchao.float8` fail
    with pytest.raises(ImportError, match=r"'torchao' package.*pip install torchao"):
        Float8Precision()


@pytest.mark.skipif(HAS_FP8, reason="this machine has FP8 hardware")
def test_emulate_false_without_fp8_hardware_says_what_is_missing() -> None:
    with pytest.raises(RuntimeError, match=r"emulate=False.*(no CUDA GPU|capability).*emulate=True"):
        Float8Precision(emulate=False)


def test_real_kernels_with_model_off_cuda_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8_module, "fp8_hardware_missing", lambda: None)  # pretend an FP8 GPU exists
    plugin = Float8Precision(emulate=False)
    assert plugin.compute_dtype == torch.bfloat16  # auto with real kernels
    model = plugin.convert_module(_classifier("mlp"))
    with pytest.raises(RuntimeError, match=r"CUDA device.*\['cpu'\].*emulate=True"):
        plugin.connect(model, [], [])


def test_real_kernels_pad_a_batch_that_is_not_a_multiple_of_16(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from torchao.float8 import convert_to_float8_training

    monkeypatch.setattr(fp8_module, "fp8_hardware_missing", lambda: None)  # pretend an FP8 GPU exists
    real = Float8Precision(emulate=False).float8_config()
    assert real.pad_inner_dim and not Float8Precision(emulate=True).float8_config().pad_inner_dim
    x = torch.randn(41, 64)  # the last digits batch of an epoch at batch size 64: 1257 = 19 * 64 + 41
    grads = []
    for config in (dataclasses.replace(real, emulate=True), Float8Precision(emulate=True).float8_config()):
        torch.manual_seed(0)
        net = convert_to_float8_training(nn.Sequential(nn.Linear(64, 32)), config=config)
        net(x).square().sum().backward()
        grads.append(net[0].weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)  # zero padding changes nothing


@pytest.mark.skipif(HAS_FP8, reason="this machine has FP8 hardware")
def test_auto_emulates_without_hardware_and_says_so_once(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(fp8_module, "_said", set())
    with caplog.at_level(logging.INFO):
        plugins = [Float8Precision(), Float8Precision(recipe="rowwise")]
    assert all(p.emulate and p.compute_dtype == torch.float32 for p in plugins)  # auto: float32 when emulating
    assert sum("emulating FP8" in r.getMessage() for r in caplog.records) == 1
    assert Float8Precision(compute_dtype="bfloat16").precision == "bf16-true"


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_forward_context_sets_and_restores_default_dtype(compute_dtype: str) -> None:
    plugin = Float8Precision(emulate=True, compute_dtype=compute_dtype)
    with plugin.forward_context():
        assert torch.get_default_dtype() == plugin.compute_dtype
    with pytest.raises(RuntimeError, match="step failed"), plugin.forward_context():
        raise RuntimeError("step failed")
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_every_recipe_runs_under_inference_mode(recipe: str) -> None:
    """Lightning validates under torch.inference_mode, where torchao cannot reshape rowwise FP8 tensors."""
    plugin = Float8Precision(recipe=recipe, emulate=True)
    model = plugin.convert_module(_classifier("vit")).eval()
    with torch.inference_mode():
        x = torch.rand(4, 1, 8, 8)
        with plugin.forward_context():
            out = model(plugin.convert_input(x))
        assert torch.is_inference_mode_enabled()
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def _e4m3_tensorwise(t: torch.Tensor) -> torch.Tensor:
    """Oracle: dynamic tensorwise scaling to E4M3 and back (scale = 448 / amax)."""
    scale = torch.finfo(torch.float8_e4m3fn).max / t.abs().max().clamp(min=1e-12)
    return (t * scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() / scale


def test_forward_matches_e4m3_oracle_and_differs_from_fp32() -> None:
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(64, 32))
    x = torch.randn(16, 64)
    exact = linear(x)
    oracle = _e4m3_tensorwise(x) @ _e4m3_tensorwise(linear[0].weight).T + linear[0].bias
    plugin = Float8Precision(emulate=True, compute_dtype="float32", skip=[])
    model = plugin.convert_module(linear)
    with plugin.forward_context():
        out = model(x)
    torch.testing.assert_close(out, oracle, atol=1e-5, rtol=1e-5)
    rel = ((out - exact).norm() / exact.norm()).item()
    assert 1e-3 < rel < 0.1  # really rounded to 8 bits, and still close


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_reference_module_is_a_plain_copy(recipe: str) -> None:
    plugin = Float8Precision(recipe=recipe, emulate=True, compute_dtype="bfloat16")
    model = plugin.convert_module(_classifier("vit"))
    x = torch.rand(8, 1, 8, 8)
    with plugin.forward_context():
        model(plugin.convert_input(x)).float().sum().backward()  # every recipe trains in emulation
    ref = plugin.reference_module(model, torch.float64)
    assert _fp8_names(ref) == [] and _fp8_names(model) == VIT_FP8  # the original keeps its FP8 layers
    assert {p.dtype for p in ref.parameters()} == {torch.float64}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    plain = _classifier("vit").double()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(ref(x.double()), plain(x.double()))


def test_digits_training_checkpoint_reloads_into_plain_model(tmp_path: Path) -> None:
    plugin = Float8Precision(emulate=True)
    model, trainer, ckpt = fit_classifier(tmp_path, net="mlp", epochs=2, plugins=[plugin], **FAST)
    dm = DigitsDataModule(batch_size=64)
    fp8_acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    assert fp8_acc > 0.3  # 24 steps learn something (chance: 0.1); the accuracy target is the slow test
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)  # no torchao objects needed
    assert all(type(v) is torch.Tensor for v in raw["state_dict"].values())
    assert raw["Float8Precision"]["recipe"] == "tensorwise"
    assert raw["Float8Precision"]["converted_layers"] == MLP_FP8
    assert read_checkpoint(ckpt)["state_dict"].keys() == raw["state_dict"].keys()
    plain, _ = load_classifier(ckpt)
    assert _fp8_names(plain) == []
    x, y = dm.dataset("test").tensors
    plain_acc = (plain(x).argmax(1) == y).float().mean().item()
    assert abs(plain_acc - fp8_acc) <= 0.02


def test_resume_continues_from_checkpoint(tmp_path: Path) -> None:
    _, first, ckpt = fit_classifier(tmp_path / "a", net="mlp", epochs=1, plugins=[Float8Precision(emulate=True)],
                                    **FAST)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    seen: dict[str, object] = {}

    class Check(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            seen["fp8"] = _fp8_names(pl_module)
            seen["equal"] = all(torch.equal(v, saved[k]) for k, v in pl_module.state_dict().items())
            seen["step"] = trainer.global_step

    plugin = Float8Precision(emulate=True, recipe="rowwise")
    dm = DigitsDataModule(batch_size=64)
    model = Classifier(net="mlp", input_shape=[1, 8, 8], num_classes=10)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path / "b"), plugins=[plugin],
                        callbacks=[Check()], **FAST)
    with pytest.warns(UserWarning, match="recipe='tensorwise'"):
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    assert seen == {"fp8": MLP_FP8, "equal": True, "step": first.global_step}
    assert trainer.global_step == 2 * first.global_step
    assert "val/acc" in trainer.callback_metrics  # validated (inference mode) with the rowwise recipe


@pytest.mark.parametrize(("name", "recipe"), [("fp8", "tensorwise"), ("fp8_rowwise", "rowwise")])
def test_hydra_entries_instantiate(name: str, recipe: str) -> None:
    plugin = instantiate(compose_train([f"precision={name}"]).precision)
    assert isinstance(plugin, Float8Precision) and plugin.recipe == recipe and plugin.skip == ["classifier"]


def test_torchao_import_noise_is_filtered_but_real_warnings_show() -> None:
    code = ("import logging; logging.basicConfig(level=logging.INFO); "  # show every record, as Hydra does
            "import sys; from lp_lightning.precision import Float8Precision; "
            "assert 'torchao' not in sys.modules, 'torchao imported eagerly'; Float8Precision(emulate=True); "
            "logging.getLogger('torchao').warning('a real torchao warning')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "a real torchao warning" in out.stderr
    if not torch.cuda.is_available():
        assert not any(noise in out.stderr for noise in ("Failed to load", "Enum subclass", "no triton")), out.stderr


def test_tolerance_audit_certifies_fp8_against_its_fp32_self(tmp_path: Path) -> None:
    from lp_lightning.callbacks import ToleranceAudit

    audit = ToleranceAudit(reference="float32", plot=False)
    fit_classifier(tmp_path, net="mlp", epochs=2, plugins=[Float8Precision(emulate=True, compute_dtype="bfloat16")],
                   callbacks=[audit], **FAST)
    report = audit.last_report
    assert report is not None and report["violations"] == 0 and report["nonfinite"] == 0
    assert report["low_precision"].startswith("Float8Precision")
    assert report["err_mean"] > 0 and report["agreement"] >= report["certified_fraction"] > 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FP8, reason=f"needs FP8 hardware: {fp8_module.fp8_hardware_missing()}")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_real_fp8_kernels_match_emulation(recipe: str) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).cuda()
    x = torch.randn(128, 256, device="cuda")
    outs = []
    for emulate in (False, True):
        plugin = Float8Precision(recipe=recipe, emulate=emulate, compute_dtype="bfloat16")
        model = plugin.convert_module(plugin.reference_module(base, torch.float32))
        with plugin.forward_context():
            out = model(x.bfloat16())
        out.float().sum().backward()
        outs.append(out.float())
    torch.testing.assert_close(outs[0], outs[1], atol=0.05, rtol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("net", ["mlp", "vit"])
def test_fp8_reaches_fp32_accuracy_on_digits(tmp_path: Path, net: str) -> None:
    """Target: FP8 (CPU emulation) within 2 points of fp32 on digits (same seed, data, schedule)."""
    epochs, opt = (10, None) if net == "mlp" else (15, {"name": "adamw", "lr": 3e-3})
    dm = DigitsDataModule(batch_size=64)
    accs = {}
    for name, plugins in (("fp32", []), ("fp8", [Float8Precision(emulate=True)])):
        model, trainer, _ = fit_classifier(tmp_path / name, net=net, epochs=epochs, plugins=plugins, optimizer=opt)
        accs[name] = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    assert accs["fp8"] >= accs["fp32"] - 0.02, accs


def test_speed_benchmark_reports_ratios(tmp_path: Path) -> None:
    from lp_lightning.tools.bench import fp8_speed

    out = tmp_path / "fp8_speed.json"
    report = fp8_speed.main(["--width", "32", "--batch", "16", "--depth", "1", "--steps", "2", "--out", str(out)])
    assert out.is_file() and report["fp8_over_bf16"] > 0
    expected = {"bf16", "fp8", "fp8_rowwise"} if torch.cuda.is_available() else {"fp32", "bf16", "fp8", "fp8_fp32"}
    assert set(report["ms_per_step"]) == expected


def test_speed_benchmark_records_threads_and_warmup(tmp_path: Path) -> None:
    from lp_lightning.tools.bench import fp8_speed

    before = torch.get_num_threads()
    out = tmp_path / "fp8_speed.json"
    report = fp8_speed.main(["--threads", "1", "--warmup", "1", "--width", "32", "--batch", "16", "--depth", "1",
                             "--steps", "3", "--out", str(out)])
    assert torch.get_num_threads() == before  # restored for the caller
    saved = json.loads(out.read_text())
    assert saved["threads"] == report["threads"] == 1 and saved["warmup"] == 1
    assert all(len(times) == 3 for times in saved["ms_per_round"].values())  # timed rounds only, no warm-up


def test_speed_benchmark_warms_up_then_rotates_the_order(monkeypatch: pytest.MonkeyPatch) -> None:
    from lp_lightning.tools.bench import fp8_speed

    assert fp8_speed.round_orders(["a", "b", "c"], 4) == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                          ["a", "b", "c"]]
    calls: list[str] = []
    monkeypatch.setattr(fp8_speed, "make_step", lambda v, args, device: lambda: calls.append(v))
    times = fp8_speed.measure(["a", "b", "c"], argparse.Namespace(warmup=2, steps=3), "cpu")
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # untimed warm-up of every variant first
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # then rounds, each variant first once
    assert {v: len(t) for v, t in times.items()} == {"a": 3, "b": 3, "c": 3}
