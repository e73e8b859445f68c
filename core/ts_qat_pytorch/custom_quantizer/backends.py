"""The built-in backends. A new backend is one default qconfig plus one registered quantizer class:

    @register_model_quantizer("MyNPU", {...default qconfig dict...})
    class MyNPUQuantizer(ModelQuantizer): ...

and ``prepare_by_platform(model, "MyNPU")`` uses it; nothing else changes.
"""
from __future__ import annotations

from .registry import register_model_quantizer
from .model_quantizer import ModelQuantizer

# TSQAT: INT8. Weights int8 symmetric per output channel, activations uint8 asymmetric per tensor,
# both with learned scales (LSQ). Full statement in scheme.py.
TSQAT_QCONFIG = {
    "w_qscheme": {"bit": 8, "symmetry": True, "per_channel": True, "pot_scale": False},
    "a_qscheme": {"bit": 8, "symmetry": False, "per_channel": False, "pot_scale": False},
    "w_fakequantize": "LearnableFakeQuantize",
    "a_fakequantize": "LearnableFakeQuantize",
    "w_observer": "MinMaxObserver",
    "a_observer": "EMAMinMaxObserver",
}


@register_model_quantizer("TSQAT", TSQAT_QCONFIG)
class TSQATQuantizer(ModelQuantizer):
    """INT8 deployment on integer accelerators and onnxruntime (QDQ)."""

    allowed_bits = range(8, 9)
    # W8A16 layers where 8-bit activations lose too much (AIMET-style): uint16 QDQ at opset 21, run by onnxruntime
    wide_activation_bits = (16,)
    # NPU converters (RKNN, ...) want a concat's inputs and output on one grid: a copy, no requantization
    shared_concat_scales = True


# Experimental: the same scheme with 2..8 bits chosen separately for weights and activations
# (w_qscheme={'bit': 4}, a_qscheme={'bit': 4} for W4A4). Default W8A8.
EXPERIMENTAL_QCONFIG = dict(TSQAT_QCONFIG)


@register_model_quantizer("Experimental", EXPERIMENTAL_QCONFIG)
class ExperimentalQuantizer(ModelQuantizer):
    """Research bit widths (2..8 bits, weights and activations independently)."""

    allowed_bits = range(2, 9)


# ONNXRuntime: TSQAT with 7-bit weights ([-64, 63], "reduce range"). On x86 CPUs without VNNI,
# onnxruntime's fast uint8 x int8 kernels saturate with full 8-bit weights; 7 bits keep them exact.
ONNXRUNTIME_QCONFIG = dict(TSQAT_QCONFIG, w_qscheme={"bit": 7, "symmetry": True, "per_channel": True,
                                                     "pot_scale": False})


@register_model_quantizer("ONNXRuntime", ONNXRUNTIME_QCONFIG)
class ONNXRuntimeQuantizer(ModelQuantizer):
    """Deployment with onnxruntime on CPUs: fast integer kernels that match training exactly. Linear / matmul
    outputs that feed float ops stay float: onnxruntime's QGemm and MatMulIntegerToFloat write them directly,
    which saves a QuantizeLinear/DequantizeLinear pair per layer and its rounding."""

    allowed_bits = range(7, 9)
    float_outputs = True
