"""QAT layers (weight fake quantization) and fused conv/linear + BN (+ReLU) layers."""
from .fused import *  # noqa: F401,F403
from .fused import FUSED_MODULES, _FusedMixin
from .modules import (QAT_MODULE_MAPPING, Conv1d, Conv2d, ConvTranspose1d, ConvTranspose2d, Embedding, Linear,
                      QATMixin)

FusedQATModule = _FusedMixin
