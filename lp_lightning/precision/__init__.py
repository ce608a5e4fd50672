"""Lightning precision plugins: pure 16-bit, FP8 and INT8/INT4 fake-quant."""

from lp_lightning.precision.fp8 import Float8Precision

__all__: list[str] = ["Float8Precision"]
