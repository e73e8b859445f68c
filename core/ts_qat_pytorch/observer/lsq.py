from __future__ import annotations

import math

import torch

from ..scheme import QuantScheme
from .base import EPS, adopt_saved_shapes
from .minmax import EMAMinMaxObserver


class LSQObserver(EMAMinMaxObserver):
    """The LSQ initialiser (Esser et al. 2020): scale = 2 * mean|x| / sqrt(quant_max).

    Min / max are tracked too, for the zero point of asymmetric schemes.
    """

    def __init__(self, scheme: QuantScheme, ema_ratio: float = 0.9):
        super().__init__(scheme, ema_ratio)
        self.register_buffer("tensor_norm", torch.tensor(float("nan")))

    @torch.no_grad()
    def forward(self, x):
        if not self.usable(x):
            return x
        super().forward(x)
        xf = x.detach().float()
        if self.scheme.per_channel:
            norm = xf.transpose(0, self.scheme.ch_axis).reshape(xf.shape[self.scheme.ch_axis], -1).abs().mean(1)
        else:
            norm = xf.abs().mean()
        if self.tensor_norm.shape != norm.shape or torch.isnan(self.tensor_norm).any():
            self.tensor_norm = norm
        else:
            self.tensor_norm = self.tensor_norm * self.ema_ratio + norm * (1 - self.ema_ratio)
        return x

    def calculate_qparams(self):
        _, zero_point = super().calculate_qparams()
        scale = torch.clamp(2 * self.tensor_norm / math.sqrt(self.scheme.quant_max), min=EPS).float()
        if not self.scheme.symmetry:
            zero_point = torch.clamp(self.scheme.quant_min - torch.round(torch.clamp(self.min_val, max=0) / scale),
                                     self.scheme.quant_min, self.scheme.quant_max).int()
        return scale, zero_point

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adopt_saved_shapes(self, state_dict, prefix, ("tensor_norm",))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
