"""The reproduction page's text: the markdown of every section from the benchmarks' results."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lp_lightning.tools.bench import lemma1

PLOTS_SHOWN = {("cnn", "fp16"), ("cnn", "int4w"), ("mlp", "fp8"), ("mlp", "int8")}
PAPER_TABLE2 = ("Paper (CIFAR-10, 50 seeds, RTX 4080): mean accuracy difference FP16-FP32 = -0.2 pt, "
                "FP16-MP = -0.2 pt; speedup FP32/FP16 = 1.6x, MP/FP16 = 1.3x.")
PAPER_TABLE3 = ("Paper (CIFAR-10, FP16 + Adam): ResNet-18 74.4 / 78.2 / 74.7 / 22.5 / 12.8 / 11.7 and ResNet-34 "
                "78.5 / 79.7 / 77.7 / 18.2 / 17.0 / 10.0 for eps = 1e-2 .. 1e-7.")


def export_markdown(rows: list[dict[str, Any]]) -> str:
    """Size, latency and agreement of the INT8/INT4 models relative to fp32, one line per model."""
    lines = ["| model | fp32 size kB | fp32 acc | int8 acc | int4 acc | int8 agree | int4 agree | int8 size | "
             "int4 size | int8 lat b1 | int8 lat b64 | int4 lat b1 | int4 lat b64 | targets missed |",
             "|" + "---|" * 14]
    for r in rows:
        missed = ", ".join(t for t, ok in r["targets"].items() if not ok) or "none"
        lines.append(
            f"| {r['model']} | {r['fp32_kB']:.0f} | {r['fp32_acc']:.3f} | {r['int8_acc']:.3f} | {r['int4_acc']:.3f} "
            f"| {r['int8_agree']:.3f} | {r['int4_agree']:.3f} | {r['int8_size_x']:.2f}x | {r['int4_size_x']:.2f}x "
            f"| {r['int8_lat_b1_x']:.2f}x | {r['int8_lat_b64_x']:.2f}x | {r['int4_lat_b1_x']:.2f}x "
            f"| {r['int4_lat_b64_x']:.2f}x | {missed} |")
    return "\n".join(lines)


def render(results: dict[str, Any], info: dict[str, Any], command: str, seconds: dict[str, float],
           img: str) -> str:
    """The markdown page."""
    isa = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["isa"].items())
    jobs, threads = info.get("table2_jobs", 1), info.get("table2_threads", 1)
    runs = f"{jobs} at a time, {threads} thread{'s' if threads > 1 else ''} each"
    speed_where = f"GPU ({info['gpu']})" if info["gpu"] else "CPU"
    lemma_rows = [r for r in results["lemma1"]["rows"] if "plot" in r]
    shown = [r for r in lemma_rows if (r["model"], r["precision"]) in PLOTS_SHOWN] or lemma_rows[:4]
    plots = "\n".join(f"![{r['model']} {r['precision']}]({img}/{Path(r['plot']).name})" for r in shown)
    return f"""# lp_lightning: reproduction report

Every number on this page was produced by one command on the machine below:

```bash
{command}
```

Runs found finished under `--work-dir` (a `metrics.json` per run folder, written by the same benchmarks) are
read back, not retrained, so a section can take seconds.
Generated {datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}; sections took
{", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())} (total {sum(seconds.values()) / 60:.1f} min).
Data: scikit-learn's bundled handwritten digits (1797 8x8 images; split 1257 train / 270 val / 270 test),
not the paper's CIFAR-10, so the models are small and absolute accuracies are not comparable with the
paper's; the comparisons between precisions are.

Machine: {info['cpu']}, {info['cores']} threads, {isa}; GPU: {info['gpu'] or 'none'}.
Versions: Python {info['python']}, torch {info['torch']}, lightning {info['lightning']}, torchao {info['torchao']},
onnx {info['onnx']}, onnxruntime {info['onnxruntime']}, onnxscript {info['onnxscript']}.

## 1. Table 2 in miniature: accuracy and time by precision

`lp-train precision=<p> model=<m> optimizer=sgd seed=<s>` for every mlp and cnn cell (SGD momentum 0.9 as
in the paper; the vit keeps its AdamW, lr 3e-3, with eps=1e-3, safe in fp16: with SGD and gradient clipping
docs/pure16.md measures it). fp16/bf16 are PureHalfPrecision with `compute=auto`,
i.e. 16-bit storage with fp32-accumulated matrix products on this CPU; fp16_mixed runs as bf16 autocast on
a CPU; fp8 is torchao emulation, only on the nets with Linear layers it can take. Time per epoch comes from
separate runs ({runs}), so it moves with the machine's load; section 5 measures step times side by side.
{PAPER_TABLE2}

{results['table2']['markdown']}

## 2. Table 3 in miniature: pure fp16 + Adam, accuracy by eps

cnn on digits, PureHalfPrecision("float16"), Adam; with and without `EpsilonGuard(action="fix")`.
{PAPER_TABLE3}

{results['table3']['markdown']}

## 3. Lemma 1: tolerance versus floating-point error

Each precision trained with `callbacks=audit`; the last epoch's ToleranceAudit compares the trained model
with its own weights evaluated in fp32 on the validation split. Paper (MNIST): mean err ~1e-3, mean tol
~1e-1. `certified` (tol > 2 err) is a lower bound on `agreement`; `violations` must be 0.

{lemma1.to_markdown(results['lemma1']['rows'])}

{plots}

## 4. Export: fp32 / INT8 / INT4 ONNX models in onnxruntime

`lp-export` per model (static QDQ INT8 with x86 settings, INT4 MatMulNBits + INT4 Conv weights); sizes and
latencies (batch 1 and 64, {results['export'].get('threads', 1)} thread) relative to the fp32 ONNX model,
agreement = top-1 agreement with the PyTorch fp32 model on the test split.

{export_markdown(results['export']['rows'])}

## 5. Pure 16-bit memory and step time ({speed_where})

Memory = bytes of parameters + gradients + optimizer state; step time = the fastest timed training step
(the first step of each round is not timed; min and median tables are both printed), one thread, variants
interleaved round by round in one run.

```
{results['speed']['text'].strip()}
```

## 6. Pure 16-bit updates and norm statistics over seeds (SGD and AdamW)

Test accuracy %, mean over seeds {results['pure16']['seeds']} (difference to fp32 in points), worst seed;
{results['pure16']['threads']} thread per run. "nearest": `update=nearest norm_stats=16bit` (in-place 16-bit
steps and 16-bit BatchNorm statistics, as Lightning's 16-true/bf16-true); "default": `PureHalfPrecision`'s
defaults (the optimizer step on fp32 copies, rounded back with a Kahan buffer for fp16 and stochastically for
bf16; BatchNorm statistics in fp32). SGD:
lr 0.05, momentum 0.9 (the vit: gradient clipping 1.0, 25 epochs); AdamW: eps 1e-3 (the vit: lr 3e-3).
`resnet` is the tests' TinyResNet (BatchNorm, residual adds, depthwise convolutions) on its own DataModule.

{results['pure16']['markdown']}

## 7. QAT fine-tuned from fp32 vs QAT from scratch

`lp-train precision=int8 init_from=<the fp32 run's best.ckpt>` (weights only, 0.1x the lr, 4 epochs) against
QAT from scratch for the fp32 run's epochs; SGD momentum 0.9; seeds {results['finetune']['seeds']};
{results['finetune']['threads']} thread per run. Test accuracy %, mean (difference to fp32), worst seed.

{results['finetune']['markdown']}
"""
