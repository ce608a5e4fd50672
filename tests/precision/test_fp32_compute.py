"""The fp32_accumulate compute mode: fp32 matrix products, 16-bit everything else (incl. saved tensors)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lp_lightning.precision import PureHalfPrecision, fp32_compute
from lp_lightning.precision.fp32_compute import Fp32Accumulate, _SavedAs16Bit, resolve_compute

DTYPES = [torch.float16, torch.bfloat16]


def _saved_dtypes(fn, monkeypatch):
    """Run ``fn``; return (its output, the dtypes of every tensor autograd stored for backward).

    Products store their saved tensors through ``_SavedAs16Bit.pack`` (the innermost hooks win), every
    other op through the outer hooks here: both are recorded.
    """
    dtypes: set[torch.dtype] = set()
    original = _SavedAs16Bit.pack

    def spy(self, t):
        packed = original(self, t)
        dtypes.add((packed if isinstance(packed, torch.Tensor) else packed[0]).dtype)
        return packed

    def pack(t):
        dtypes.add(t.dtype)
        return t

    monkeypatch.setattr(_SavedAs16Bit, "pack", spy)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, dtypes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer", ["linear", "conv", "bmm", "matmul3d"])
def test_products_are_fp32_rounded_to_16bit(dtype, layer, monkeypatch):
    torch.manual_seed(0)
    if layer == "linear":
        mod = nn.Linear(32, 16).to(dtype)
        x = torch.randn(8, 32).to(dtype).requires_grad_()
        fn = lambda inp: mod(inp)  # noqa: E731
        ref = lambda inp: F.linear(inp.float(), mod.weight.float(), mod.bias.float())  # noqa: E731
    elif layer == "conv":
        mod = nn.Conv2d(3, 8, 3, padding=1).to(dtype)
        x = torch.randn(4, 3, 8, 8).to(dtype).requires_grad_()
        fn = lambda inp: mod(inp)  # noqa: E731
        ref = lambda inp: F.conv2d(inp.float(), mod.weight.float(), mod.bias.float(), padding=1)  # noqa: E731
    else:
        mod = nn.Module()
        mod.weight = nn.Parameter(torch.randn(4, 32, 16).to(dtype))
        x = torch.randn(4, 8, 32).to(dtype).requires_grad_()
        op = torch.bmm if layer == "bmm" else torch.matmul
        fn = lambda inp: op(inp, mod.weight)  # noqa: E731
        ref = lambda inp: op(inp.float(), mod.weight.float())  # noqa: E731

    with Fp32Accumulate(dtype):
        out, saved = _saved_dtypes(lambda: fn(x), monkeypatch)
        out.float().square().sum().backward()
    assert out.dtype == dtype
    assert dtype in saved and saved <= {dtype, torch.int64}, saved  # no fp32 copy is kept for backward
    torch.testing.assert_close(out, ref(x).to(dtype), rtol=0, atol=0)  # fp32 result rounded once

    grads = [x.grad, *[p.grad for p in mod.parameters()]]
    assert {g.dtype for g in grads} == {dtype}
    x32 = x.detach().float().requires_grad_()
    want = torch.autograd.grad(ref(x32).to(dtype).float().square().sum(), [x32])[0]
    torch.testing.assert_close(x.grad.float(), want, rtol=2e-2, atol=1e-2)


def test_other_dtypes_pass_through():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with Fp32Accumulate(torch.float16):
        assert (a @ b).dtype == torch.float32
        assert (a.bfloat16() @ b.bfloat16()).dtype == torch.bfloat16


def test_plugin_applies_mode_in_forward_and_backward(monkeypatch):
    seen: list[object] = []
    plugin = PureHalfPrecision("float16", compute="fp32_accumulate")
    mod = plugin.convert_module(nn.Linear(8, 4))
    original = Fp32Accumulate.__torch_function__

    def spy(self, func, types, args=(), kwargs=None):
        seen.append(func)
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(Fp32Accumulate, "__torch_function__", spy)
    with plugin.forward_context():
        loss = mod(plugin.convert_input(torch.randn(2, 8))).float().sum()
    plugin.backward(loss, _NoHooks(), None)
    assert F.linear in seen
    assert mod.weight.grad.dtype == torch.float16
    # the backward ran the fp32 kernel: the gradient is the fp32 product rounded once
    x16 = plugin.convert_input(torch.ones(2, 8))
    want = torch.ones(4, 2) @ x16.float()
    mod.weight.grad = None
    with plugin.forward_context():
        loss = mod(x16).float().sum()
    plugin.backward(loss, _NoHooks(), None)
    torch.testing.assert_close(mod.weight.grad, want.half(), rtol=0, atol=0)


def test_views_of_operands_are_stored_as_the_operand(monkeypatch):
    w = torch.randn(16, 32).half().requires_grad_()
    x = torch.randn(8, 32).half().requires_grad_()
    stored: list[object] = []
    original = _SavedAs16Bit.pack

    def spy(self, t):
        packed = original(self, t)
        stored.append(packed)
        return packed

    monkeypatch.setattr(_SavedAs16Bit, "pack", spy)
    with Fp32Accumulate(torch.float16):
        out = F.linear(x, w)
    assert any(p[0] is w and p[2] is not None for p in stored)  # w.t(): the operand itself plus strides
    assert any(p[0] is x and p[2] is None for p in stored)
    out.float().sum().backward()
    torch.testing.assert_close(w.grad, (torch.ones(16, 8) @ x.float()).half(), rtol=0, atol=0)


def test_no_grad_products_keep_16bit_results(monkeypatch):
    a, b = torch.randn(4, 8).half(), torch.randn(8, 3).half()
    upcast: list[torch.Tensor] = []
    original = fp32_compute._up
    monkeypatch.setattr(fp32_compute, "_up", lambda v, *rest: upcast.append(v) or original(v, *rest))
    with torch.no_grad(), Fp32Accumulate(torch.float16):
        out = a @ b
    assert len(upcast) == 2 and upcast[0] is a and upcast[1] is b  # the @ operator is intercepted
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, (a.float() @ b.float()).half(), rtol=0, atol=0)


class _NoHooks:
    """Enough of a LightningModule for ``Precision.backward``: it calls ``model.backward(loss)``."""

    @staticmethod
    def backward(loss: torch.Tensor, *args, **kwargs) -> None:
        loss.backward(*args, **kwargs)


@pytest.mark.parametrize("dtype, flags, device, want", [
    (torch.float16, set(), "cpu", "fp32_accumulate"),
    (torch.bfloat16, set(), "cpu", "fp32_accumulate"),
    (torch.bfloat16, {"avx512_bf16"}, "cpu", "native"),
    (torch.float16, {"avx512_bf16"}, "cpu", "fp32_accumulate"),
    (torch.float16, {"amx_fp16"}, "cpu", "native"),
    (torch.float16, set(), "cuda", "native"),
])
def test_auto_resolution(monkeypatch, dtype, flags, device, want):
    monkeypatch.setattr(fp32_compute, "_cpu_flags", lambda: frozenset(flags))
    assert resolve_compute("auto", dtype, device)[0] == want
    assert resolve_compute("native", dtype, device)[0] == "native"


def test_auto_choice_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(fp32_compute, "_cpu_flags", lambda: frozenset())
    plugin = PureHalfPrecision("bfloat16")
    plugin.convert_module(nn.Linear(2, 2))
    # the logger's own level: benchmarks run in-process by other tests set "lightning.pytorch" to WARNING
    with caplog.at_level("INFO", logger="lightning.pytorch.utilities.rank_zero"):
        for _ in range(3):
            with plugin.forward_context():
                pass
    assert plugin.compute_mode == "fp32_accumulate"
    assert sum("compute='fp32_accumulate'" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_matches_fp32_and_keeps_16bit(dtype, monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8).to(dtype).requires_grad_() for _ in range(3))
    stored: list[torch.Tensor] = []
    original = _SavedAs16Bit.pack

    def spy(self, t):
        packed = original(self, t)
        stored.append(packed if isinstance(packed, torch.Tensor) else packed[0])
        return packed

    monkeypatch.setattr(_SavedAs16Bit, "pack", spy)
    with Fp32Accumulate(dtype):
        out = F.scaled_dot_product_attention(q, k, v)
    out.float().sum().backward()
    # q, k, v and the output are stored in 16 bits; only the per-row logsumexp stays fp32, as natively
    assert {t.dtype for t in stored if t.dim() == 4} == {dtype}
    assert {t.dtype for t in stored if t.dim() == 3} <= {torch.float32}
    ref = F.scaled_dot_product_attention(q.detach().float(), k.detach().float(), v.detach().float())
    assert out.dtype == dtype and {t.grad.dtype for t in (q, k, v)} == {dtype}
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_attention_with_keyword_arguments():
    q, k, v = (torch.randn(1, 2, 4, 8).half().requires_grad_() for _ in range(3))
    with Fp32Accumulate(torch.float16):
        out = F.scaled_dot_product_attention(query=q, key=k, value=v)
    out.float().sum().backward()
    ref = F.scaled_dot_product_attention(q.detach().float(), k.detach().float(), v.detach().float())
    assert out.dtype == torch.float16 and q.grad.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_cpu_convolutions_run_channels_last_with_nchw_parameters():
    conv = nn.Conv2d(3, 8, 3, padding=1).half()
    x = torch.randn(4, 3, 8, 8).half().requires_grad_()
    with Fp32Accumulate(torch.float16):
        out = conv(x)
    assert out.is_contiguous(memory_format=torch.channels_last)  # the fp32 kernel ran channels-last
    out.float().square().sum().backward()
    assert conv.weight.grad.is_contiguous() and conv.weight.grad.dtype == torch.float16
    ref = F.conv2d(x.detach().float(), conv.weight.float(), conv.bias.float(), padding=1)
    torch.testing.assert_close(out, ref.half(), rtol=0, atol=0)
    assert out.flatten(1).shape == (4, 8 * 8 * 8)


def test_inplace_change_of_a_saved_operand_is_detected():
    w = torch.randn(4, 8).half().requires_grad_()
    x = torch.randn(2, 8).half()
    with Fp32Accumulate(torch.float16):
        out = F.linear(x, w)
    x.mul_(2)  # x is stored for the weight gradient
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.float().sum().backward()


class _WithMetric(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        self.acc = MulticlassAccuracy(num_classes=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _spy_products(monkeypatch) -> list[object]:
    seen: list[object] = []
    original = Fp32Accumulate.__torch_function__

    def spy(self, func, types, args=(), kwargs=None):
        seen.append(func)
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(Fp32Accumulate, "__torch_function__", spy)
    return seen


def _converted(module: nn.Module, batch: int) -> tuple[PureHalfPrecision, nn.Module, torch.Tensor]:
    """An fp32_accumulate fp16 plugin, ``module`` converted by it and a converted (batch, 8) input."""
    plugin = PureHalfPrecision("float16", compute="fp32_accumulate")
    return plugin, plugin.convert_module(module), plugin.convert_input(torch.randn(batch, 8))


def test_forward_context_intercepts_only_the_module_forwards(monkeypatch):
    seen = _spy_products(monkeypatch)
    plugin, module, x = _converted(_WithMetric(), 16)
    with plugin.forward_context():
        logits = module(x)
        assert F.linear in seen and F.relu in seen  # the whole forward runs under the mode
        seen.clear()
        module.acc(logits.float(), torch.randint(0, 4, (16,)))  # a metric: not intercepted
        torch.mm(x, x.t())  # a product outside a forward: native kernels, not intercepted
    assert seen == []
    module(x)  # outside the plugin's context: not intercepted either
    assert seen == []
    torch.testing.assert_close(logits, _reference(module.net, x), rtol=0, atol=0)


def test_forward_scope_recovers_from_a_failing_forward_and_detaches(monkeypatch):
    seen = _spy_products(monkeypatch)
    plugin = PureHalfPrecision("float16", compute="fp32_accumulate")
    module = plugin.convert_module(nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
    with pytest.raises(RuntimeError), plugin.forward_context():
        module(plugin.convert_input(torch.randn(2, 7)))  # wrong width: F.linear raises inside the mode
    assert torch.overrides._get_current_function_mode_stack() == []  # the mode was popped
    seen.clear()
    with plugin.forward_context():
        module(plugin.convert_input(torch.randn(2, 8)))
    assert F.linear in seen
    plugin.teardown()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in module.modules())


def _reference(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``net`` run layer by layer in fp32, each Linear's result rounded to 16 bits (what fp32_accumulate does)."""
    out = x
    for layer in net:
        out = layer(out) if not isinstance(layer, nn.Linear) else \
            F.linear(out.float(), layer.weight.float(), layer.bias.float()).to(x.dtype)
    return out


class _Interrupt(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise KeyboardInterrupt


def test_interrupted_forward_leaves_no_mode_behind():
    # torch runs always_call forward hooks on Exception only: Ctrl-C skips the hook that leaves the mode
    plugin = PureHalfPrecision("float16", compute="fp32_accumulate")
    module = plugin.convert_module(nn.Sequential(nn.Linear(8, 8), _Interrupt()))
    with pytest.raises(KeyboardInterrupt), plugin.forward_context():
        module(plugin.convert_input(torch.randn(2, 8)))
    assert torch.overrides._get_current_function_mode_stack() == []
    a = torch.randn(4, 4).half()
    assert torch.equal(torch.mm(a, a), torch.mm(a, a))  # runs natively again, no leftover mode


class _Steps(nn.Module):
    """A LightningModule-like root: ``training_step`` does a product and calls ``self(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, x: torch.Tensor) -> torch.Tensor:
        out = self(x)
        return torch.mm(out, out.t())  # outside any module's forward


class _Wrapper(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


def test_lightning_forward_redirection_keeps_the_step_outside_the_mode(monkeypatch):
    # under DDP Lightning runs training_step by patching the module's forward and calling the DDP wrapper
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    seen = _spy_products(monkeypatch)
    plugin, module, x = _converted(_Steps(), 4)
    with plugin.forward_context():
        _ForwardRedirection()(_Wrapper(module), module, "training_step", x)
        assert F.linear in seen and torch.mm not in seen
        seen.clear()
        module(x)  # the forward restored on the instance by the redirection is still hooked
    assert F.linear in seen


def test_a_deep_copy_follows_the_plugins_context(monkeypatch):
    seen = _spy_products(monkeypatch)
    plugin, module, x = _converted(nn.Linear(8, 8), 2)
    with plugin.forward_context():
        copied = copy.deepcopy(module)  # copied while the scope is active, with its hooks
    copied(x)
    assert seen == []
    with plugin.forward_context():
        copied(x)
    assert F.linear in seen


class _Checkpointed(L.LightningModule):
    """Two Linear layers with a ReLU between them, optionally under non-reentrant activation checkpointing."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.a, self.b, self.checkpointed = nn.Linear(64, 64), nn.Linear(64, 64), checkpointed
        self.grads: dict[str, torch.Tensor] = {}

    def _inner(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._inner, x, use_reentrant=False) if self.checkpointed else self._inner(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).float().square().mean()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.grads = {n: p.grad.clone() for n, p in self.named_parameters()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    data = DataLoader(TensorDataset(torch.randn(32, 64)), batch_size=32)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(1)
        model = _Checkpointed(checkpointed)
        trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, accelerator="cpu",
                            plugins=[PureHalfPrecision("float16", compute="fp32_accumulate")])
        trainer.fit(model, data)
        grads.append(model.grads)
    assert grads[1]["a.weight"].dtype == torch.float16
    for name in grads[0]:  # the recompute runs the same fp32 products: bit-identical gradients
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_products_leave_their_saved_tensors_to_checkpointing(monkeypatch) -> None:
    packed = []
    original = _SavedAs16Bit.pack
    monkeypatch.setattr(_SavedAs16Bit, "pack", lambda self, t: packed.append(t) or original(self, t))
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).half()
    x = torch.randn(4, 8, dtype=torch.float16, requires_grad=True)
    with Fp32Accumulate(torch.float16):
        net(x)
        assert packed  # outside checkpointing the products store 16-bit operands themselves
        packed.clear()
        out = checkpoint(net, x, use_reentrant=False)  # which then frees them and recomputes in backward
    assert not packed and out.dtype == torch.float16
