"""Lightning precision plugins: pure 16-bit, FP8 and INT8/INT4 fake-quant."""

__all__: list[str] = []
