"""Small ONNX graph helpers shared by the exporters: atomic saving, metadata, module scopes, sizes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from lp_lightning.io import atomic_path

_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


class ExportError(RuntimeError):
    """An export step failed (parity, nothing quantized, unsupported graph); the message names the step."""


def strip_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without node metadata and doc strings (stack traces that inflate the file)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    out.graph.doc_string = ""
    return out


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Check and write ``model`` with every weight inside the one file, atomically (temp name, rename)."""
    model = strip_metadata(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"invalid ONNX model for {str(path)!r}: {str(exc).splitlines()[0]}") from exc
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)
    return Path(path)


def file_size(path: str | os.PathLike[str]) -> int:
    """Bytes of the model file plus any external-data side files it references."""
    file = Path(path)
    size = file.stat().st_size
    model = onnx.load(str(file), load_external_data=False)
    side = {
        entry.value
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    return size + sum((file.parent / name).stat().st_size for name in side)


@dataclass(frozen=True)
class LayerNode:
    """The ONNX node computing a torch layer: its op, input activation and weight initializer names."""

    op_type: str
    activation: str
    weight: str


def layer_nodes(model: onnx.ModelProto) -> dict[str, LayerNode]:
    """Map fully-qualified torch module names to their Gemm/MatMul/Conv node.

    A node is named by its weight initializer (``<fqn>.weight``, kept by the dynamo exporter for Gemm and
    Conv, also after BatchNorm folding) and by the exporter's name-scope metadata (MatMul on transposed
    weights); the initializer name wins.
    """
    inits = {i.name for i in model.graph.initializer}
    by_scope: dict[str, LayerNode] = {}
    by_weight: dict[str, LayerNode] = {}
    for node in model.graph.node:
        if node.op_type not in ("Gemm", "MatMul", "Conv") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        layer = LayerNode(node.op_type, node.input[0], node.input[1])
        if node.input[1].endswith(".weight"):
            by_weight.setdefault(node.input[1].removesuffix(".weight"), layer)
        scopes = next((p.value for p in node.metadata_props if p.key == _SCOPES_KEY), None)
        names = [s.strip(" '\"") for s in scopes.strip("[]").split(",")] if scopes else []
        if len(names) >= 2 and names[-2]:
            by_scope.setdefault(names[-2], layer)
    return {**by_scope, **by_weight}


def op_types(model: onnx.ModelProto) -> list[str]:
    """Sorted distinct op types of the graph."""
    return sorted({node.op_type for node in model.graph.node})
