"""How fake quantization becomes ONNX operators (the manual's ``custom_symbolic_opset``).

The ancestor registered custom ONNX symbolic functions here, for its fake-quantize autograd functions and the
legacy exporter. This package registers none, so importing this module changes nothing in torch's exporters:
``convert_export`` first freezes every fake quantizer into a :class:`QDQ` module built on torch's own
``fake_quantize_per_tensor_affine`` / ``fake_quantize_per_channel_affine`` (``freeze_for_export``), which both
of torch's exporters translate into QuantizeLinear / DequantizeLinear themselves; widths below 8 bits are an 8-bit
QuantizeLinear behind a Clip. What it holds, re-exported:

    QDQ                  a frozen quantizer: the module whose export is the QuantizeLinear/DequantizeLinear pair
    freeze_for_export    the pass that replaces every fake quantizer of a prepared model by a QDQ

Scripts that ``import mqbench.custom_symbolic_opset`` for its side effect can import this module instead, or drop
the import.
"""
from .onnx.freeze import freeze_for_export
from .onnx.qdq import QDQ

__all__ = ["QDQ", "freeze_for_export"]
