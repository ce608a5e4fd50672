"""The reproduction page: the papers' claims measured with lp_lightning, with plots.

    python -m lp_lightning.tools.bench.reproduce                 # everything (well under 90 min on 2 cores)
    python -m lp_lightning.tools.bench.reproduce --quick         # 1 seed, fewer epochs (under 10 min)
    python -m lp_lightning.tools.bench.reproduce --write-docs    # regenerate the committed docs/REPRODUCTION.md

Writes ``REPRODUCTION.md``, ``reproduction.json`` and ``img/*.png`` into ``--out-dir`` (default
``outputs/reproduction`` under the current directory); only ``--write-docs`` writes into the repository's docs/.

Runs the benchmarks of tools/bench (table2, table3, lemma1, export, half_speed) through their ``main``
functions, keeps their raw results in ``<out-dir>/reproduction.json`` and writes the page and its PNGs.
On a CUDA machine the speed section is measured on the GPU (fp32 vs pure fp16 vs mixed).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from lp_lightning.io import atomic_write, write_json
from lp_lightning.tools.bench import export as export_bench
from lp_lightning.tools.bench import half_speed, lemma1, pure16, qat_finetune, table2, table3
from lp_lightning.tools.bench.repro_page import render

ALL_PRECISIONS = ["fp32", "fp16", "bf16", "fp16_mixed", "bf16_mixed", "fp8", "int8", "int4w"]
FP8_MODELS = ("mlp", "vit")  # the cnn has no Linear layer FP8 can take (only its skipped head)
REPO_DOCS = Path(__file__).resolve().parents[2] / "docs"  # tools/bench/ -> the repository's docs/
DEFAULT_OUT = Path("outputs/reproduction")



def table2_threads(jobs: int) -> int:
    """Torch threads per table 2 run: the two cores shared by ``jobs`` parallel runs."""
    return max(1, 2 // jobs)


def plan(args: argparse.Namespace) -> dict[str, list[str]]:
    """argv of each benchmark for the chosen budget."""
    quick = args.quick
    seeds = [str(s) for s in (args.seeds or ([0] if quick else [0, 1, 2, 3, 4]))]
    epochs = args.epochs or (3 if quick else None)
    ep = ["--epochs", str(epochs)] if epochs else []
    models = args.models or ["mlp", "cnn", "vit"]
    speed_models = [m for m in ("mlp", "cnn", "vit") if m in models and not (quick and m == "vit")] or ["mlp"]
    lemma_models = [m for m in ("cnn", "mlp") if m in models]
    return {
        "table2": ["--seeds", *seeds, *ep, "--jobs", str(args.jobs), "--threads", str(table2_threads(args.jobs))],
        "table3": ["--seeds", *(seeds[:1] if quick else seeds[:3]), "--epochs", str(epochs or 5), "--threads", "2",
                   *(["--eps", "1e-2", "1e-4", "1e-8"] if quick else [])],
        "lemma1": ["--models", *lemma_models, "--epochs", str(epochs or 15)] if lemma_models else [],
        "export": ["--models", ",".join(models if quick else [*models, "mlp512", "vit128"]),
                   "--iters", "30" if quick else "200"],
        "speed": ["--models", *speed_models, "--threads", "1",  # one thread: ratios, not the other core's load
                  *(["--rounds", "2", "--steps", "3"] if quick else ["--rounds", "9"])],  # min of 27 steps each
        # pure 16-bit nearest vs defaults (5 seeds: one vit run moves by +-2 points between seeds; quick: mlp,
        # SGD, bf16 only); the TinyResNet test model when the repository's tests package is importable
        "pure16": (["--models", "mlp", "--optimizers", "sgd", "--variants", "fp32", "bf16 nearest", "bf16 default",
                    "--seeds", "0", "--epochs", str(epochs or 3)] if quick else
                   ["--models", *models, *(["resnet"] if _has_test_models() else []), "--seeds", *"01234"]),
        "finetune": ["--models", *(["mlp"] if quick else ["cnn"]), "--seeds", *(["0"] if quick else ["0", "1", "2"]),
                     *(["--epochs", str(epochs or 3)] if quick else [])],
    }


def _has_test_models() -> bool:
    """Whether the repository's tests package (with its user package) is importable."""
    try:
        import tests.user_pkg.models  # noqa: F401
    except ImportError:
        return False
    return True


def run_lemma1(argv: list[str], img: Path, precisions: list[str]) -> dict[str, Any]:
    """The Lemma 1 audit; nothing to run (no rows) without a cnn/mlp or a precision other than fp32."""
    if not argv or not precisions:
        return {"rows": []}
    return lemma1.main([*argv, "--plots", str(img), "--precisions", *precisions])


def run_table2(argv: list[str], work: Path, models: list[str], precisions: list[str]) -> dict[str, Any]:
    """Table 2 over every precision; FP8 only on the nets that have Linear layers it can take."""
    common = [*argv, "--root", str(work / "table2")]
    main_prec = [p for p in precisions if p != "fp8"]
    table = table2.main([*common, "--models", *models, "--precisions", *main_prec]) if main_prec else {}
    fp8_models = [m for m in models if m in FP8_MODELS]
    if "fp8" in precisions and fp8_models:
        # finished fp32 runs are read back, not retrained
        fp8 = table2.main([*common, "--models", *fp8_models, "--precisions", "fp32", "fp8"])
        for model, row in fp8.items():
            table.setdefault(model, {}).update(row)
    return {"table": table, "markdown": table2.markdown(table, precisions)}


class _Tee(io.StringIO):
    """Keeps what is written and echoes it, so long benchmarks still show their progress lines."""

    def __init__(self, echo: Any) -> None:
        super().__init__()
        self.echo = echo

    def write(self, text: str) -> int:
        self.echo.write(text)
        self.echo.flush()
        return super().write(text)


def captured(fn: Callable[[], Any]) -> tuple[Any, str, float]:
    """Run ``fn`` with its stdout kept (and echoed live); return result, text and seconds."""
    buf = _Tee(sys.stdout)
    start = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        result = fn()
    return result, buf.getvalue(), time.perf_counter() - start


def machine() -> dict[str, Any]:
    """The CPU/GPU and library versions the page was produced with."""
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")),
                 platform.processor())
    words = set(flags.split())
    return {
        "cpu": model, "cores": os.cpu_count(),
        "isa": {f: f in words for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")},
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(), "platform": platform.platform(),
        **{pkg: version(pkg) for pkg in ("torch", "lightning", "torchao", "onnx", "onnxruntime", "onnxscript")},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``out_dir`` is outputs/reproduction unless ``--out-dir`` or ``--write-docs``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, fewer eps and models")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="where the page and its PNGs go")
    where.add_argument("--write-docs", action="store_const", const=REPO_DOCS, dest="out_dir",
                       help=f"write into the repository's docs/ ({REPO_DOCS})")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--models", nargs="+", default=None, choices=["mlp", "cnn", "vit"])
    parser.add_argument("--precisions", nargs="+", default=ALL_PRECISIONS, choices=ALL_PRECISIONS)
    parser.add_argument("--jobs", type=int, default=2, help="parallel training runs in table 2")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    given = shlex.join(sys.argv[1:] if argv is None else argv)
    command = f"python -m lp_lightning.tools.bench.reproduce {given}".strip()
    argvs = plan(args)
    models = args.models or ["mlp", "cnn", "vit"]
    img = args.out_dir / "img"
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        steps: dict[str, Callable[[], Any]] = {
            "table2": lambda: run_table2(argvs["table2"], work, models, args.precisions),
            "table3": lambda: table3.main(argvs["table3"]),
            "lemma1": lambda: run_lemma1(argvs["lemma1"], img, [p for p in args.precisions if p != "fp32"]),
            "export": lambda: export_bench_json(argvs["export"], work),
            "speed": lambda: half_speed.main(argvs["speed"]),
            "pure16": lambda: pure16.main([*argvs["pure16"], "--root", str(work / "pure16")]),
            "finetune": lambda: qat_finetune.main([*argvs["finetune"], "--root", str(work / "finetune")]),
        }
        for name, step in steps.items():
            print(f"== reproduce: {name} ({' '.join(argvs[name])})", flush=True)
            result, text, seconds[name] = captured(step)
            results[name] = {**result, "text": text} if isinstance(result, dict) else {"result": result, "text": text}
    info = machine()
    info["table2_jobs"], info["table2_threads"] = args.jobs, table2_threads(args.jobs)
    write_json(args.out_dir / "reproduction.json", {"machine": info, "command": command, "seconds": seconds,
                                                     "results": results})
    page = args.out_dir / "REPRODUCTION.md"
    text = render(results, info, command, seconds, "img")
    atomic_write(page, lambda tmp_path: tmp_path.write_text(text))
    print(f"wrote {page}")
    return page


def export_bench_json(argv: list[str], work: Path) -> dict[str, Any]:
    """Run the export benchmark and return its JSON (rows, cpu, reports)."""
    out = work / "export.json"
    export_bench.main([*argv, "--work-dir", str(work / "export"), "--out", str(out)])
    return json.loads(out.read_text())


if __name__ == "__main__":
    main()
