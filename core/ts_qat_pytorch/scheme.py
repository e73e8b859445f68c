"""Quantization schemes: how a tensor is mapped onto integers.

A scheme is data, not behaviour. Observers turn statistics into (scale, zero_point) for a scheme,
fake quantizers apply it, and the exporter writes it as QuantizeLinear/DequantizeLinear.

The built-in backends (see ``custom_quantizer``):

TSQAT (default, INT8)
    weights      int8, symmetric (zero point 0), per output channel, range [-128, 127],
                 scale = max|w_c| / 127 at initialisation, then learned (LSQ).
    activations  uint8, asymmetric, per tensor, range [0, 255], scale and zero point from an
                 EMA min/max observer during calibration; the scale is then learned (LSQ) and
                 the zero point stays fixed (an integer, as deployed).
    W8A16 layers activations of chosen layers (module_qconfig, a_qscheme bit 16) in uint16, range
                 [0, 65535], weights unchanged; exported as 16-bit QuantizeLinear/DequantizeLinear (opset 21).

ONNXRuntime (INT8 activations, 7-bit weights)
    as TSQAT with weights in [-64, 63]: onnxruntime's fast uint8 x int8 kernels on x86 CPUs without
    VNNI sum products in int16 and saturate with full 8-bit weights; 7-bit weights never do.
    A Linear / matmul output that only float ops consume stays float (``float_outputs``): onnxruntime's
    QGemm / MatMulIntegerToFloat write it directly.

Experimental (2 to 8 bits, chosen separately)
    as TSQAT, with ``w_qscheme['bit']`` / ``a_qscheme['bit']`` in 2..8 (e.g. W4A4, W4A8).
    Below 8 bits the ONNX export carries the narrow range as a Clip in front of an 8-bit
    QuantizeLinear (numerically identical) and the JSON carries the true bit width.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

__all__ = ["QuantScheme"]


@dataclass(frozen=True)
class QuantScheme:
    """How one tensor is quantized.

    bit:         integer width, 2..8; 16 for activations where the backend allows it (TSQAT: W8A16 layers).
    symmetry:    zero point fixed (0 for signed, quant_min for unsigned).
    per_channel: one scale per slice along ``ch_axis``.
    pot_scale:   scales rounded up to powers of two.
    signed:      integer range signed ([-2^(b-1), 2^(b-1)-1]) or unsigned ([0, 2^b-1]);
                 defaults to ``symmetry``.
    """

    bit: int = 8
    symmetry: bool = True
    per_channel: bool = False
    pot_scale: bool = False
    ch_axis: int = 0
    signed: bool | None = None

    def __post_init__(self):
        if not 2 <= int(self.bit) <= 16:
            raise ValueError(f"bit must be within 2..16, got {self.bit}")
        if self.signed is None:
            object.__setattr__(self, "signed", bool(self.symmetry))

    @property
    def quant_min(self) -> int:
        return -(2 ** (self.bit - 1)) if self.signed else 0

    @property
    def quant_max(self) -> int:
        return 2 ** (self.bit - 1) - 1 if self.signed else 2 ** self.bit - 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(quant_min=self.quant_min, quant_max=self.quant_max)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, base: "QuantScheme | None" = None) -> "QuantScheme":
        """Build a scheme from a user dict (the ancestor's ``w_qscheme`` / ``a_qscheme``)."""
        base = base or cls()
        if not d:
            return base
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown quantization scheme keys {unknown}; valid keys: {sorted(valid)}")
        d = dict(d)
        if "symmetry" in d and "signed" not in d:
            d["signed"] = None  # follow the new symmetry, not the base's
        return replace(base, **d)
