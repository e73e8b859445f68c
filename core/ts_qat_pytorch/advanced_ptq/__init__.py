"""Post-training quantization beyond calibration: AdaRound, BRECQ and QDrop reconstruction.

    from ts_qat_pytorch.advanced_ptq import ptq_reconstruction
    report = ptq_reconstruction(model, calibration_batches, {"pattern": "block", "prob": 0.5})

``config`` (data, the ancestor's keys), ``adaround`` (the learned rounding and its write-back into the weights),
``segments`` (how a prepared GraphModule is cut into layers / blocks), ``reconstruction`` (the verb).
"""
from .config import ReconstructionConfig
from .reconstruction import ReconstructionReport, UnitResult, ptq_reconstruction

__all__ = ["ptq_reconstruction", "ReconstructionConfig", "ReconstructionReport", "UnitResult"]
