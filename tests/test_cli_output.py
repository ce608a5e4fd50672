"""What a newcomer sees: lp-train, lp-audit and lp-export piped (not a terminal) print no progress frames, each
plugin message once, none of Lightning's hardware/tip lines, and end with one result line; run from another
directory they write nothing into the repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICK = ["model=mlp", "trainer.max_epochs=1", "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=2",
         "+trainer.limit_test_batches=2"]
NOISE = ("GPU available", "TPU available", "💡 Tip", "LeafSpec", "Restoring states", "Loaded model weights")


def _new_paths() -> set[str]:
    """The repository's untracked and ignored paths (outputs/ is ignored yet must not appear either), without
    byte-code caches and source files (developers editing the clone meanwhile add those; our tools never)."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    return {line[3:] for line in out.splitlines() if line[:2] in ("??", "!!") and not line.endswith((".py", ".md"))
            and not any(cache in line for cache in ("__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache"))}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)  # stdout: a pipe
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stream in (proc.stdout, proc.stderr):
        assert "\r" not in stream and not any(n in stream for n in NOISE), stream
    return proc


def test_quiet_piped_runs_end_with_a_result_line_and_leave_the_clone_clean(tmp_path: Path) -> None:
    before = _new_paths()
    train = _run([str(BIN / "lp-train"), *QUICK, "precision=int4w", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    out = train.stdout.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("test/acc=") and out[0].endswith(f"{tmp_path / 'run'}/metrics.json")
    # the plugin converts the module for fit, validate and test: its line once; no unmatched-skip line for the mlp
    assert train.stderr.count("layer(s) fake-quantized") == 1 and "match no module" not in train.stderr
    log = (tmp_path / "run" / "train.log").read_text()
    assert "GPU available" in log and log.count("layer(s) fake-quantized") == 3  # the log file keeps everything
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"

    audit = _run([str(BIN / "lp-audit"), f"ckpt={ckpt}", "precision=bf16", "max_samples=64", "plot=false"], tmp_path)
    last = audit.stdout.strip().splitlines()[-1]
    assert last.startswith("lp-audit: ") and "violations=0" in last and last.endswith("audit_report.json")

    export = _run([str(BIN / "lp-export"), f"ckpt={ckpt}", "formats=[fp32]", "iters=2", "warmup=1",
                   "latency_batch_sizes=1"], tmp_path)
    assert "[lp-export]" not in export.stdout  # the steps' lines only with verbose=true
    last = export.stdout.strip().splitlines()[-1]
    assert last.startswith("lp-export: fp32 acc=") and last.endswith(f"{ckpt.parent / 'export'}/export_report.json")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs", "run"]  # lp-audit's run dir is under outputs/
    assert _new_paths() <= before, sorted(_new_paths() - before)
