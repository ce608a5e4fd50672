"""lp_lightning: low-precision training for PyTorch Lightning, with numerical audits and ONNX export."""

__version__ = "0.1.0"

__all__ = ["__version__"]
