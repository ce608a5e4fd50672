"""PureHalfPrecision under DDP on CPU (gloo, 2 processes): 16-bit gradients all-reduced, one loss scale."""

from __future__ import annotations

import re

import pytest

from tests.ddp import run_ddp_script

DDP_BODY = """
import torch.distributed as dist
from lp_lightning.precision import PureHalfPrecision

def main(dtype):
    L.seed_everything(0)
    plugin = PureHalfPrecision(dtype, loss_scale="dynamic", init_scale=2.0**24)
    model = Classifier(net="mlp", input_shape=[1, 8, 8], num_classes=10)
    trainer = ddp_trainer(".", plugins=[plugin], max_epochs=2, limit_val_batches=2, gradient_clip_val=1.0)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    want = getattr(torch, dtype)
    assert {p.dtype for p in model.parameters()} == {want}
    assert {s["momentum_buffer"].dtype for s in trainer.optimizers[0].state.values()} == {want}
    assert torch.get_default_dtype() == torch.float32
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    same = bool(torch.equal(spread, flat))  # every rank holds the same weights
    scale = torch.tensor([plugin.scaler.scale])
    top = scale.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    acc = float(trainer.callback_metrics["val/acc"])
    print(f"RANK {trainer.global_rank} same={same} scale={plugin.scaler.scale} top={float(top)} "
          f"skipped={plugin.scaler.skipped_steps} acc={acc:.3f}", flush=True)

if __name__ == "__main__":
    import sys
    main(sys.argv[1] if len(sys.argv) > 1 else "float16")
"""


def test_ddp_fp16_dynamic_scale(tmp_path):
    proc = run_ddp_script(DDP_BODY, tmp_path)
    lines = re.findall(r"RANK (\d) same=(\w+) scale=(\S+) top=(\S+) skipped=(\d+) acc=([0-9.]+)", proc.stdout)
    assert sorted(line[0] for line in lines) == ["0", "1"], proc.stdout
    for _, same, scale, top, skipped, acc in lines:
        assert same == "True"
        assert float(scale) == float(top) < 2.0**24  # one scale on every rank, backed off from the overflow
        assert int(skipped) >= 1
        assert float(acc) > 0.5


BN_BODY = """
import torch.distributed as dist
from lp_lightning.precision import PureHalfPrecision

def main(update):
    L.seed_everything(0)
    torch.manual_seed(int(__import__("os").environ.get("LOCAL_RANK", "0")) + 100)  # ranks' own RNGs differ
    plugin = PureHalfPrecision("bfloat16", compute="native", update=update)
    model = Classifier(net="cnn", input_shape=[1, 8, 8], num_classes=10)
    trainer = ddp_trainer(".", plugins=[plugin], max_epochs=1, limit_train_batches=6, limit_val_batches=0)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    stats = [b for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]
    assert stats and {b.dtype for b in stats} == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    print(f"RANK {trainer.global_rank} same={bool(torch.equal(spread, flat))}", flush=True)

if __name__ == "__main__":
    import sys
    main(sys.argv[1] if len(sys.argv) > 1 else "stochastic")
"""


@pytest.mark.slow  # ~30 s on 2 cores: two Lightning processes
def test_ddp_bf16_stochastic_updates_keep_ranks_equal(tmp_path):
    """Each rank draws the rounding noise from its own generator, seeded from rank 0: the weights stay equal
    (the user's RNG differs per rank here), and BatchNorm's running statistics stay fp32 under DDP."""
    proc = run_ddp_script(BN_BODY, tmp_path)
    # the two ranks share one pipe: a line can lose its newline to the other rank's write
    lines = re.findall(r"RANK (\d) same=(True|False)", proc.stdout)
    assert sorted(rank for rank, _ in lines) == ["0", "1"], proc.stdout
    assert all(same == "True" for _, same in lines), proc.stdout
