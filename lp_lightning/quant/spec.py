"""Quantization settings (a frozen dataclass) and the parsing of YAML-friendly bit-width strings."""

from __future__ import annotations

from dataclasses import dataclass

WEIGHT_BITS = (8, 4)
ACT_BITS = (8,)
GRANULARITIES = ("per_channel", "per_group")


def parse_bits(value: object, argument: str, allowed: tuple[int, ...], allow_none: bool = False,
               owner: str = "") -> int | None:
    """``"int8"``/``"int4"``/``8``/``4`` (and ``None``/``"none"`` when allowed) -> bits; ValueError otherwise.

    The error names ``argument`` (inside ``owner(...)`` when given), shows the value and lists what is allowed.
    """
    names = [f"'int{b}'" for b in allowed] + (["None"] if allow_none else [])
    if value is None or (isinstance(value, str) and value.lower() in ("none", "fp32", "float32")):
        if allow_none:
            return None
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int) and value in allowed:
        return value
    elif isinstance(value, str) and value.lower().startswith("int") and value[3:].isdigit():
        bits = int(value[3:])
        if bits in allowed:
            return bits
    shown = f"{owner}({argument}={value!r})" if owner else f"{argument}={value!r}"
    raise ValueError(f"{shown} is not supported; allowed: {', '.join(names)}")


@dataclass(frozen=True)
class QuantSpec:
    """How one layer is fake-quantized.

    Args:
        weight_bits: 8 or 4; weights are symmetric (zero point 0) on the grid ``[-2^(b-1)+1, 2^(b-1)-1]``.
        granularity: ``"per_channel"`` (one scale per output channel) or ``"per_group"`` (one scale per
            ``group_size`` consecutive input weights of an output channel; Linear only, Conv stays per channel).
        group_size: the group length for ``"per_group"``.
        act_bits: 8 (asymmetric per-tensor int8 on the layer input, range [-128, 127]) or None (no activation
            quantization).
        averaging_constant: weight of a new batch in the moving-average min/max observer.
    """

    weight_bits: int = 8
    granularity: str = "per_channel"
    group_size: int | None = None
    act_bits: int | None = 8
    averaging_constant: float = 0.1

    def check(self, layer: str = "<layer>") -> None:
        """Raise ValueError naming ``layer`` and the bad value when a setting is unsupported."""
        if isinstance(self.weight_bits, bool) or self.weight_bits not in WEIGHT_BITS:
            raise ValueError(f"layer {layer!r}: weight_bits={self.weight_bits!r} is not supported; "
                             f"allowed: {list(WEIGHT_BITS)}")
        if self.act_bits is not None and self.act_bits not in ACT_BITS:
            raise ValueError(f"layer {layer!r}: act_bits={self.act_bits!r} is not supported; "
                             f"allowed: {list(ACT_BITS)} or None")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"layer {layer!r}: granularity={self.granularity!r} is not supported; "
                             f"allowed: {list(GRANULARITIES)}")
        if self.granularity == "per_group" and (
                isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"layer {layer!r}: group_size={self.group_size!r} must be a positive int "
                             "for granularity='per_group'")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant={self.averaging_constant!r} must be in (0, 1]")

    @property
    def weight_qrange(self) -> tuple[int, int]:
        """``(quant_min, quant_max)`` passed to torch's fake-quantize ops for the weights."""
        return -(2 ** (self.weight_bits - 1)), 2 ** (self.weight_bits - 1) - 1
