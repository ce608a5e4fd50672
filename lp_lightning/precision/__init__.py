"""Lightning precision plugins: pure 16-bit, FP8 and INT8/INT4 fake-quant."""

from lp_lightning.precision.fake_quant import FakeQuantPrecision
from lp_lightning.precision.fp8 import Float8Precision
from lp_lightning.precision.half import PureHalfPrecision

__all__ = ["FakeQuantPrecision", "Float8Precision", "PureHalfPrecision"]
