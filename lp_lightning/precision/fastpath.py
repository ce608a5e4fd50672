"""Keep torch's fused Transformer fast path from bypassing swapped layers in eval steps."""

from __future__ import annotations

import contextlib
from collections.abc import Generator

import torch


@contextlib.contextmanager
def transformer_fastpath_off() -> Generator[None, None, None]:
    """Turn off the fused ``nn.TransformerEncoderLayer``/``nn.MultiheadAttention`` fast path; restore it after.

    In eval mode without gradients (Lightning's validate/test/predict) torch runs those layers through one
    fused kernel that reads ``linear1.weight`` etc. directly, so a swapped layer's own ``forward`` (fake-quant,
    FP8) would never run and the metrics would be the float model's.
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)
