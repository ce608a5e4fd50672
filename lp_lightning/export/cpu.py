"""What the CPU offers for quantized kernels (flags from /proc/cpuinfo), recorded in the export report."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

import onnxruntime as ort

INTERESTING = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
               "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16", "asimd", "asimddp")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")


@lru_cache(maxsize=1)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor (empty when /proc/cpuinfo is not readable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def has_vnni(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU has an 8-bit dot-product instruction (VNNI/AMX on x86, dotprod on ARM)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in VNNI_FLAGS)


def cpu_info() -> dict[str, Any]:
    """Model name, core count, relevant flags, VNNI and the onnxruntime version, for the report."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    return {
        "model_name": name,
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "flags": sorted(f for f in flags if f in INTERESTING),
        "vnni": has_vnni(flags),
        "onnxruntime": ort.__version__,
    }
