"""State switches: which fake quantizers observe and which fake-quantize.

    enable_calibration(model)                  observers on, fake quant off (collect ranges)
    enable_quantization(model)                 observers off, fake quant on (QAT / evaluation)
    enable_calibration_woquantization(model, quantizer_type="fake_quant")
                                               that kind: observers on, fake quant off; the others: both off
    enable_calibration_quantization(model, quantizer_type="fake_quant")
                                               that kind: observers and fake quant on; the others: both off
    disable_all(model)                         both off: the float model

``quantizer_type``: "fake_quant" (all), "weight_fake_quant" or "act_fake_quant". As in MQBench, the two
``enable_calibration_*`` switches turn the quantizers of the other kind off entirely (float).
``utils.calibrate.calibrate(model, batches)`` runs a whole calibration with these switches.
"""
from __future__ import annotations

import logging

from torch import nn

from ..fake_quantize import QuantizeBase

logger = logging.getLogger(__name__)

_TYPES = ("fake_quant", "weight_fake_quant", "act_fake_quant")


def _quantizers(model: nn.Module, quantizer_type: str = "fake_quant"):
    if quantizer_type not in _TYPES:
        raise ValueError(f"quantizer_type must be one of {_TYPES}, got {quantizer_type!r}")
    found = False
    for name, m in model.named_modules():
        if isinstance(m, QuantizeBase):
            found = True
            if quantizer_type == "fake_quant" or (quantizer_type == "weight_fake_quant") == m.is_weight:
                yield name, m
    if not found:
        raise ValueError("the model has no fake quantizers: call prepare_by_platform(model, backend) first")


def _set(model, quantizer_type, observe: bool, quant: bool) -> None:
    """The selected kind gets (observe, quant); the other kind is turned off (the ancestor's behaviour)."""
    selected = {name for name, _ in _quantizers(model, quantizer_type)}
    for name, m in _quantizers(model):
        if name in selected:
            m.enable_observer(observe).enable_fake_quant(quant)
        else:
            m.enable_observer(False).enable_fake_quant(False)


def enable_calibration(model: nn.Module) -> None:
    logger.info("calibration: observers on, fake quantization off")
    _set(model, "fake_quant", observe=True, quant=False)


def enable_quantization(model: nn.Module) -> None:
    logger.info("quantization: observers off, fake quantization on")
    _set(model, "fake_quant", observe=False, quant=True)


def enable_calibration_woquantization(model: nn.Module, quantizer_type: str = "fake_quant") -> None:
    logger.info("calibration of %s: observers on, fake quantization off; other quantizers off", quantizer_type)
    _set(model, quantizer_type, observe=True, quant=False)


def enable_calibration_quantization(model: nn.Module, quantizer_type: str = "fake_quant") -> None:
    logger.info("calibration of %s with fake quantization on; other quantizers off", quantizer_type)
    _set(model, quantizer_type, observe=True, quant=True)


def disable_all(model: nn.Module) -> None:
    logger.info("all quantizers off: float model")
    _set(model, "fake_quant", observe=False, quant=False)


def freeze_bn_stats(model: nn.Module, frozen: bool = True) -> None:
    """Stop (or restart) BatchNorm statistics updates in every fused layer (late in QAT)."""
    for m in model.modules():
        if hasattr(m, "freeze_bn_stats") and getattr(m, "bn", None) is not None:
            m.freeze_bn_stats(frozen)
