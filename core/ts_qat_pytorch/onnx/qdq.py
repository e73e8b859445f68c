"""QDQ: a frozen fake quantizer with constant parameters, exported as QuantizeLinear/DequantizeLinear.

Scales and zero points of per-tensor quantizers are Python numbers: the exporter then writes them
as scalars, which is what onnxruntime needs to fuse Add/Concat/pooling into integer kernels.
Widths below 8 bits are carried by a Clip in front of the 8-bit QuantizeLinear: the same numbers
as the narrow quantizer, in a container onnxruntime runs everywhere.

Signed weights are stored as the scheme's int8 integers with zero point 0, the convention of onnxruntime's
quantize_static, TensorRT and NPU converters. ``as_uint8`` (export option ``weight_dtype="uint8"``) shifts them
by 128 into uint8 instead: on x86 CPUs without VNNI, onnxruntime's uint8 x int8 kernels sum pairs of products
in int16 with saturation, which moved mobilenet_v2's logits by 60 output steps (16 with uint8 x uint8).
uint8 x uint8 is exact there but no faster than float; 7-bit weights (the ONNXRuntime backend) keep the fast
uint8 x int8 kernels exact on every x86 CPU.

Ranges wider than 8 bits (16-bit activations, W8A16 layers) use a 16-bit container: in PyTorch the module computes
the true 16-bit fake quantization (the reference the export is checked against); under ONNX export it writes an
8-bit-typed QuantizeLinear/DequantizeLinear placeholder, because torch's exporters only write 8-bit ones, which
onnx/wide.py then turns into the real uint16 / int16 pair (opset 21). convert_export runs that pass.
"""
from __future__ import annotations

import torch
from torch import nn

from ..fake_quantize import QuantizeBase


class QDQ(nn.Module):
    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int,
                 signed: bool, ch_axis: int = -1, as_uint8: bool = False):
        super().__init__()
        if signed and as_uint8:  # same real values, integers shifted by 128 (see module docstring)
            zero_point, quant_min, quant_max, signed = zero_point + 128, quant_min + 128, quant_max + 128, False
        self.cmin, self.cmax = (-128, 127) if signed else (0, 255)
        if quant_min < self.cmin or quant_max > self.cmax:  # 16-bit container (see module docstring)
            self.cmin, self.cmax = (-32768, 32767) if signed else (0, 65535)
        if quant_min < self.cmin or quant_max > self.cmax:
            raise ValueError(f"range [{quant_min}, {quant_max}] does not fit a 16-bit QuantizeLinear; ONNX "
                             "QuantizeLinear/DequantizeLinear hold at most 16-bit integers here: use bit <= 16")
        self.wide = self.cmax - self.cmin > 255
        self.ch_axis = ch_axis
        self.narrow = (quant_min, quant_max) != (self.cmin, self.cmax)
        scale, zero_point = scale.detach().float().reshape(-1), zero_point.detach().reshape(-1).int()
        if ch_axis >= 0:
            self.register_buffer("scale", scale.clone())
            self.register_buffer("zero_point", zero_point.clone())
        else:
            self.scale, self.zero_point = float(scale[0]), int(zero_point[0])
        lo = (quant_min - zero_point.float()) * scale
        hi = (quant_max - zero_point.float()) * scale
        self.register_buffer("lo", lo)
        self.register_buffer("hi", hi)

    @torch.no_grad()
    def clip_constant(self, w: torch.Tensor) -> torch.Tensor:
        """Apply the narrow range to a constant (a weight) now, so the graph needs no Clip for it."""
        if self.narrow:
            w = torch.clamp(w, self._bound_view(self.lo, w), self._bound_view(self.hi, w))
            self.narrow = False
        return w

    @classmethod
    def from_quantizer(cls, fq: QuantizeBase) -> "QDQ":
        scale, zp = fq.qparams()
        return cls(scale, zp, fq.quant_min, fq.quant_max, fq.scheme.signed, fq.ch_axis)

    @property
    def onnx_dtype(self) -> str:
        """The integer type of the tensor in the ONNX file: uint8, int8, uint16 or int16."""
        return ("int" if self.cmin < 0 else "uint") + ("16" if self.wide else "8")

    def _bound_view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.ch_axis < 0:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[self.ch_axis] = -1
        return t.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            return x
        if self.narrow:
            x = torch.clamp(x, self._bound_view(self.lo, x), self._bound_view(self.hi, x))
        zero_point, cmin, cmax = self.zero_point, self.cmin, self.cmax
        if self.wide and torch.onnx.is_in_onnx_export():  # 8-bit placeholder, made 16-bit by onnx/wide.py
            zero_point = torch.zeros_like(zero_point) if self.ch_axis >= 0 else 0
            cmin, cmax = (-128, 127) if self.cmin < 0 else (0, 255)
        if self.ch_axis >= 0:
            return torch.fake_quantize_per_channel_affine(x, self.scale, zero_point, self.ch_axis, cmin, cmax)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, zero_point, cmin, cmax)
