"""Float8Precision under DDP on CPU (gloo, 2 processes, torchao emulation)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.ddp import run_ddp_script

DDP_BODY = """
import torch.distributed as dist
from lp_lightning.precision import Float8Precision

if __name__ == "__main__":
    L.seed_everything(0)
    plugin = Float8Precision(emulate=True)
    model = Classifier(net="mlp", input_shape=[1, 8, 8], num_classes=10)
    trainer = ddp_trainer(".", plugins=[plugin], max_epochs=2, limit_val_batches=2)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    top = flat.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    acc = float(trainer.callback_metrics["val/acc"])
    print(f"RANK {trainer.global_rank} converted={plugin.num_converted} same={bool(torch.equal(top, flat))} "
          f"default={torch.get_default_dtype()} acc={acc:.3f}", flush=True)
"""


def test_fp8_trains_under_ddp(tmp_path: Path) -> None:
    proc = run_ddp_script(DDP_BODY, tmp_path)
    lines = re.findall(r"RANK (\d) converted=(\d+) same=(\w+) default=(\S+) acc=([0-9.]+)", proc.stdout)
    assert sorted(line[0] for line in lines) == ["0", "1"], proc.stdout
    for _, converted, same, default, acc in lines:
        assert int(converted) == 2  # the mlp's two hidden Linear layers; the head is skipped
        assert same == "True"  # gradients were all-reduced: both ranks hold identical weights
        assert default == "torch.float32"
        assert float(acc) > 0.3
