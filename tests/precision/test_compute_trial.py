"""compute="auto" decided by measurement: the trial's schedule and decision, the plugin running it on a user's
model, the attention-only fp32 mode, and one choice for every DDP rank."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lp_lightning.precision import PureHalfPrecision, fp32_compute
from lp_lightning.precision import compute_trial as trial_module
from lp_lightning.precision.compute_trial import ComputeTrial
from lp_lightning.precision.fp32_compute import MODE_OPS, Fp32Accumulate, compute_candidates
from tests.ddp import run_ddp_script
from tests.user_pkg.data import DigitsRows
from tests.user_pkg.models import RowTransformer

MODES = ["native", "native_fp32_attention", "fp32_accumulate"]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(trial: ComputeTrial, clock: _Clock, seconds: dict[str, float], steps: int) -> list[str]:
    """Drive ``steps`` training steps whose duration depends on the mode; returns the mode of each step."""
    used = []
    for _ in range(steps):
        trial.step_started()
        used.append(trial.current)
        clock.now += seconds[trial.current]
    return used


def test_trial_times_each_mode_in_turn_and_keeps_the_fastest(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(trial_module.time, "perf_counter", clock)
    trial = ComputeTrial(MODES, rounds=3)
    used = _run(trial, clock, {"native": 3.0, "native_fp32_attention": 1.0, "fp32_accumulate": 2.0}, 20)
    assert used[:12] == MODES * 4  # a warm-up round, then 3 interleaved rounds
    assert trial.choice == "native_fp32_attention" and set(used[12:]) == {"native_fp32_attention"}
    assert trial.medians() == {"native": 3.0, "native_fp32_attention": 1.0, "fp32_accumulate": 2.0}
    assert all(len(t) == 3 for t in trial.times.values())  # the warm-up round is not counted


def test_near_tie_goes_to_the_flags_preference_and_evaluation_is_not_timed(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(trial_module.time, "perf_counter", clock)
    trial = ComputeTrial(MODES, rounds=1)
    for _ in MODES:  # warm-up round
        trial.step_started()
        clock.now += 1.0
    trial.step_started()
    clock.now += 100.0  # native's step, but validation ran before the next training step
    trial.step_started(interrupted=True)  # the period is dropped, native is timed again
    assert trial.current == "native" and trial.times["native"] == []
    for seconds in (1.02, 1.0, 1.5):
        clock.now += seconds
        trial.step_started()
    assert trial.medians() == pytest.approx({"native": 1.02, "native_fp32_attention": 1.0, "fp32_accumulate": 1.5})
    assert trial.choice == "native"  # 2% slower than the fastest: the flags' first choice wins


def test_one_candidate_needs_no_trial(monkeypatch) -> None:
    monkeypatch.setattr(fp32_compute, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert compute_candidates("auto", torch.float16, "cpu")[0] == ["fp32_accumulate"]  # no fp16 units here
    assert compute_candidates("auto", torch.bfloat16, "cpu")[0] == MODES
    trial = ComputeTrial(["fp32_accumulate"])
    assert trial.decided and trial.schedule == [] and not trial.step_started()


def test_native_fp32_attention_runs_only_attention_in_fp32() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(8, 16).bfloat16(), torch.randn(4, 16).bfloat16()
    q, k, v = (torch.randn(2, 2, 8, 4).bfloat16() for _ in range(3))
    with Fp32Accumulate(torch.bfloat16, MODE_OPS["native_fp32_attention"]):
        lin, att = F.linear(x, w), F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(lin, F.linear(x, w))  # the native bf16 kernel, bit for bit
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16()
    assert att.dtype == torch.bfloat16 and torch.equal(att, ref)  # fp32 attention rounded once


def test_plugin_trial_on_a_users_transformer(monkeypatch) -> None:
    monkeypatch.setattr(fp32_compute, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))
    plugin = PureHalfPrecision("bfloat16", compute="auto")
    used: list[str] = []

    class Spy(L.Callback):
        def on_before_backward(self, trainer, pl_module, loss) -> None:
            used.append(plugin.compute_mode)

    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=16, limit_val_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        plugins=[plugin], callbacks=[Spy()])
    trainer.fit(RowTransformer(d_model=16), datamodule=DigitsRows(layout="dict", batch_size=32))
    trial = plugin._trial
    assert used[:12] == trial.schedule == MODES * 4
    assert trial.decided and used[12:] == [trial.choice] * 4
    best = min(trial.medians().values())
    assert trial.medians()[trial.choice] <= best * 1.03


DDP_BODY = """
from lp_lightning.precision import PureHalfPrecision
from lp_lightning.precision import compute_trial, fp32_compute

fp32_compute._cpu_flags = lambda: frozenset({"avx512_bf16"})

def rigged(self):  # each rank would pick another mode by its own clock
    return ["native", "fp32_accumulate"][torch.distributed.get_rank()]

compute_trial.ComputeTrial.decide = rigged

if __name__ == "__main__":
    L.seed_everything(0)
    plugin = PureHalfPrecision("bfloat16")
    model = Classifier(net="mlp", input_shape=[1, 8, 8], num_classes=10)
    trainer = ddp_trainer(".", plugins=[plugin], max_epochs=1, limit_train_batches=16, limit_val_batches=0)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    top = flat.clone()
    torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
    print(f"RANK {trainer.global_rank} choice={plugin.compute_mode} same={bool(torch.equal(top, flat))}", flush=True)
"""


def test_ddp_ranks_take_rank_zeros_choice(tmp_path) -> None:
    proc = run_ddp_script(DDP_BODY, tmp_path)
    lines = re.findall(r"RANK (\d) choice=(\w+) same=(True|False)", proc.stdout)  # the ranks' lines may interleave
    assert sorted(lines) == [("0", "native", "True"), ("1", "native", "True")], proc.stdout
