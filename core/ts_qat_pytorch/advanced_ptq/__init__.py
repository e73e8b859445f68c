"""Post-training quantization beyond calibration: AdaRound, BRECQ and QDrop reconstruction; empirical bias
correction.

    from ts_qat_pytorch.advanced_ptq import bias_correction, ptq_reconstruction
    q, bc = bias_correction(model, calibration_batches)
    report = ptq_reconstruction(model, calibration_batches, {"pattern": "block", "prob": 0.5},
                                float_model=bc.float_model)

``config`` (data, the ancestor's keys), ``adaround`` (the learned rounding and its write-back into the weights),
``segments`` (how a prepared GraphModule is cut into layers / blocks), ``reconstruction`` (the verb),
``empirical_bias`` (bias correction). These run on the prepared model; the float-model steps (cross-layer
equalization, SmoothQuant) are ``ts_qat_pytorch.tools``.
"""
from .config import ReconstructionConfig
from .empirical_bias import BiasCorrectionReport, LayerShift, bias_correction
from .reconstruction import ReconstructionReport, UnitResult, ptq_reconstruction

__all__ = ["ptq_reconstruction", "ReconstructionConfig", "ReconstructionReport", "UnitResult", "bias_correction",
           "BiasCorrectionReport", "LayerShift"]
