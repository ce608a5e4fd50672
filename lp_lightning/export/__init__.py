"""ONNX export, onnxruntime INT8/INT4 quantization and evaluation."""

__all__: list[str] = []
