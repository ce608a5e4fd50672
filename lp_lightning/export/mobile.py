"""onnxruntime's ORT Mobile usability check (NNAPI, CoreML), called in-process and returned as numbers.

This is what ``python -m onnxruntime.tools.check_onnx_model_mobile_usability`` runs, without its logging:
the model is optimized to onnxruntime's BASIC level, shapes are inferred, and for every mobile execution
provider the checker's own partitioning estimate is taken twice: requiring fixed input shapes ("as is")
and ignoring shapes ("with fixed shapes", what ``make_dynamic_shape_fixed`` would give).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import onnx
from onnxruntime.tools.mobile_helpers import usability_checker as uc
from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

from lp_lightning.logs import quiet_loggers

Partitioner = Callable[[onnx.ModelProto, bool], "uc.PartitioningInfo"]

# report key -> the checker's partitioning function (the three providers the checker reports on)
PROVIDERS: dict[str, Partitioner] = {
    "nnapi": uc.check_nnapi_partitions,
    "coreml_mlprogram": lambda m, fixed: uc.check_coreml_partitions(m, fixed, "coreml_supported_mlprogram_ops.md"),
    "coreml_neuralnetwork": lambda m, fixed: uc.check_coreml_partitions(
        m, fixed, "coreml_supported_neuralnetwork_ops.md"),
}
PROVIDER_NAMES = {"nnapi": "NNAPI", "coreml_mlprogram": "CoreML MLProgram", "coreml_neuralnetwork": "CoreML NN"}

# an op the mobile providers cannot take -> the format that stores the same weights in a form they can partition
ALTERNATIVES: dict[str, dict[str, str]] = {
    "com.microsoft:MatMulNBits": {
        "format": "int4_qdq",
        "how": "INT4 weights as DequantizeLinear (blocked, opset 21) feeding MatMul: the same int4 weights and "
               "scales, in standard ONNX ops (formats=[...,int4_qdq])",
    },
}


def checker_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """The model the checker analyses: ``path`` optimized to onnxruntime's BASIC level, with inferred shapes."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "basic.onnx"
        optimize_model(Path(path), optimized, use_external_initializers=True)
        return ModelProtoWithShapeInfo(optimized).model_with_shape_info


def _partitions(info: uc.PartitioningInfo, suffix: str = "") -> dict[str, Any]:
    return {
        f"supported_nodes{suffix}": int(info.num_supported_nodes),
        f"partitions{suffix}": int(info.num_partitions),
        f"partition_sizes{suffix}": [len(g) for g in info.supported_groups],
        f"verdict{suffix}": info.suitability().name,
    }


def provider_usability(model: onnx.ModelProto, partitioner: Partitioner) -> dict[str, Any]:
    """One provider's numbers: nodes it takes as is (shapes must be fixed) and with fixed shapes, the reasons."""
    as_is = partitioner(model, True)
    fixed = partitioner(model, False)
    return {
        "nodes": int(as_is.num_nodes),
        **_partitions(as_is),
        **_partitions(fixed, "_fixed_shapes"),
        "nodes_unsupported_due_to_op": int(as_is.nodes_unsupported_due_to_op),
        "nodes_unsupported_due_to_dynamic_shape": int(as_is.nodes_unsupported_due_to_dynamic_input),
        "nodes_unsupported_due_to_rank": int(as_is.num_unsupported_nodes_due_to_rank),
        "unsupported_ops": sorted(as_is.unsupported_ops | fixed.unsupported_ops),
    }


def mobile_usability(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mobile usability of the ONNX model at ``path``: per provider (:data:`PROVIDERS`) its numbers, plus
    the dynamic graph inputs, ``try_mobile_eps`` (the checker's overall answer: some provider is not NO as is or
    with fixed shapes) and ``blockers`` (unsupported ops, each with the providers it blocks and the alternative
    format when one is known, :data:`ALTERNATIVES`)."""
    with quiet_loggers("", "usability_checker", level=logging.ERROR):
        model = checker_model(path)
        dynamic_inputs, _ = uc.check_shapes(model.graph)
        providers = {key: provider_usability(model, fn) for key, fn in PROVIDERS.items()}
    blocked: dict[str, list[str]] = {}
    for key, entry in providers.items():
        for op in entry["unsupported_ops"]:
            blocked.setdefault(op, []).append(key)
    blockers = [{"op": op, "providers": keys, "alternative": ALTERNATIVES.get(op, {}).get("format"),
                 "alternative_how": ALTERNATIVES.get(op, {}).get("how")} for op, keys in sorted(blocked.items())]
    return {
        "providers": providers,
        "dynamic_inputs": [i.name for i in dynamic_inputs],
        "try_mobile_eps": any(e["verdict"] != "NO" or e["verdict_fixed_shapes"] != "NO"
                              for e in providers.values()),
        "blockers": blockers,
    }


def summary_line(fmt: str, usability: Mapping[str, Any]) -> str:
    """One terminal line: per provider the nodes taken as is and with fixed shapes, partitions, verdicts."""
    parts = []
    for key in ("nnapi", "coreml_mlprogram"):
        e = usability["providers"][key]
        parts.append(f"{PROVIDER_NAMES[key]} {e['supported_nodes']}/{e['nodes']} as is ({e['partitions']}p "
                     f"{e['verdict']}), {e['supported_nodes_fixed_shapes']}/{e['nodes']} fixed "
                     f"({e['partitions_fixed_shapes']}p {e['verdict_fixed_shapes']})")
    blockers = "; ".join(f"{b['op']} unsupported" + (f" -> use {b['alternative']}" if b["alternative"] else "")
                         for b in usability["blockers"])
    return f"[lp-export] edge {fmt}: " + "; ".join(parts) + (f"; {blockers}" if blockers else "")
