"""Which float layer sequences fuse into which QAT layer.

Keys are (layer type, BatchNorm type or None, has activation); the activation may be a ReLU module,
``F.relu`` / ``torch.relu`` / ``Tensor.relu``. ``prepare_by_platform`` looks patterns up here; a
backend may pass its own table.
"""
from __future__ import annotations

from torch import nn

from .nn import qat

FUSION_PATTERNS: dict[tuple[type, type | None, bool], type] = {
    (nn.Conv1d, nn.BatchNorm1d, False): qat.ConvBn1d,
    (nn.Conv1d, nn.BatchNorm1d, True): qat.ConvBnReLU1d,
    (nn.Conv1d, None, True): qat.ConvReLU1d,
    (nn.Conv2d, nn.BatchNorm2d, False): qat.ConvBn2d,
    (nn.Conv2d, nn.BatchNorm2d, True): qat.ConvBnReLU2d,
    (nn.Conv2d, None, True): qat.ConvReLU2d,
    (nn.ConvTranspose1d, nn.BatchNorm1d, False): qat.ConvTransposeBn1d,
    (nn.ConvTranspose1d, nn.BatchNorm1d, True): qat.ConvTransposeBnReLU1d,
    (nn.ConvTranspose1d, None, True): qat.ConvTransposeReLU1d,
    (nn.ConvTranspose2d, nn.BatchNorm2d, False): qat.ConvTransposeBn2d,
    (nn.ConvTranspose2d, nn.BatchNorm2d, True): qat.ConvTransposeBnReLU2d,
    (nn.ConvTranspose2d, None, True): qat.ConvTransposeReLU2d,
    (nn.Linear, nn.BatchNorm1d, False): qat.LinearBn1d,
    (nn.Linear, nn.BatchNorm1d, True): qat.LinearBnReLU1d,
    (nn.Linear, None, True): qat.LinearReLU,
}

# Activations folded into the preceding layer (a deployed Conv+Relu / Conv+Clip is one kernel).
FUSABLE_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6)
