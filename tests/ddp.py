"""Run a Lightning script under DDP on CPU (gloo, 2 processes) in a fresh interpreter.

Lightning's ``strategy="ddp"`` re-launches ``sys.argv``; inside pytest that would re-run pytest, so
DDP tests write a small script and run it as its own program.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

PRELUDE = """
import atexit

import lightning as L
import torch
import torch.distributed
from lp_lightning.data import DigitsDataModule
from lp_lightning.models import Classifier

@atexit.register
def _destroy_process_group():  # an open gloo group at interpreter exit can abort ("terminate called ...")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

def ddp_trainer(root, **kwargs):
    defaults = dict(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    defaults.update(kwargs)
    return L.Trainer(**defaults)
"""


def run_ddp_script(body: str, workdir: Path, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    """Write ``PRELUDE + body`` to ``workdir/ddp_script.py`` and run it; raise with its output on failure."""
    script = workdir / "ddp_script.py"
    script.write_text(PRELUDE + "\n" + textwrap.dedent(body))
    proc = subprocess.run([sys.executable, str(script)], cwd=workdir, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"DDP script failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
