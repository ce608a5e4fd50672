"""ONNX export, onnxruntime INT8/INT4 quantization and evaluation."""

from lp_lightning.export.config import ExportConfig
from lp_lightning.export.graph import ExportError
from lp_lightning.export.int4 import export_int4, gemm_to_matmul
from lp_lightning.export.int8 import export_int8
from lp_lightning.export.onnx_fp32 import export_fp32
from lp_lightning.export.pipeline import export_module, run_export
from lp_lightning.export.report import FORMATS

__all__ = [
    "FORMATS",
    "ExportConfig",
    "ExportError",
    "export_fp32",
    "export_int4",
    "export_int8",
    "export_module",
    "gemm_to_matmul",
    "run_export",
]
