"""PACT (Choi et al. 2018): a learned clipping level alpha, quantized uniformly below it."""
from __future__ import annotations

import torch
from torch import nn

from ..observer import EPS, EMAMinMaxObserver
from .base import QuantizeBase


class PACTFakeQuantize(QuantizeBase):
    """Activations clipped to [0, alpha] (or [-alpha, alpha] for signed schemes); alpha learned.

    The gradient reaches alpha through the clip (PACT's rule); rounding uses the straight-through
    estimator.
    """

    def __init__(self, scheme, observer=EMAMinMaxObserver, alpha: float = 6.0):
        if scheme.per_channel:
            raise ValueError("PACTFakeQuantize is per tensor; use a per-tensor scheme")
        super().__init__(scheme, observer)
        self.alpha = nn.Parameter(torch.tensor([float(alpha)]))
        self.register_buffer("zero_point", torch.tensor([0 if scheme.signed else scheme.quant_min],
                                                        dtype=torch.int32))

    @property
    def _levels(self) -> int:
        return self.quant_max if self.scheme.signed else self.quant_max - self.quant_min

    def _adopt_qparams(self, scale, zero_point):
        # The observer's range initialises alpha; the zero point stays at the scheme's origin.
        alpha = float(scale.reshape(-1).max()) * self._levels
        if self.max_scale is not None:
            alpha = min(alpha, self.max_scale * self._levels)
        self.alpha.data.fill_(alpha)

    def fake_quant(self, x):
        if self.training:
            self.alpha.data.clamp_(min=EPS * self._levels)
            alpha = self.alpha
        else:  # evaluation leaves the state alone
            alpha = self.alpha.clamp(min=EPS * self._levels)
        x = torch.where(x > alpha, alpha, x)
        if self.scheme.signed:
            x = torch.where(x < -alpha, -alpha, x)
        scale = alpha.detach() / self._levels
        return torch.fake_quantize_per_tensor_affine(x, scale, self.zero_point, self.quant_min, self.quant_max)

    def qparams(self):
        return (self.alpha.detach() / self._levels).reshape(-1).clone(), self.zero_point.reshape(-1).clone()
