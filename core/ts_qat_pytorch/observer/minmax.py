from __future__ import annotations

import torch

from ..scheme import QuantScheme
from .base import ObserverBase


class MinMaxObserver(ObserverBase):
    """Running min / max over every batch seen."""


class EMAMinMaxObserver(ObserverBase):
    """Exponential moving average of each batch's min / max."""

    def __init__(self, scheme: QuantScheme, ema_ratio: float = 0.9):
        super().__init__(scheme)
        self.ema_ratio = ema_ratio

    def _merge(self, bmin: torch.Tensor, bmax: torch.Tensor):
        if not self.initialized or self.min_val.shape != bmin.shape:
            self.min_val, self.max_val = bmin, bmax
        else:
            r = self.ema_ratio
            self.min_val = self.min_val * r + bmin * (1 - r)
            self.max_val = self.max_val * r + bmax * (1 - r)
