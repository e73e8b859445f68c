from __future__ import annotations

import torch

from ..scheme import QuantScheme
from .minmax import EMAMinMaxObserver

# kthvalue on a huge activation is slow; a strided subsample keeps the estimate and the speed.
_MAX_SAMPLES = 1 << 20


class PercentileObserver(EMAMinMaxObserver):
    """Clips outliers: the ``percentile`` / ``1 - percentile`` quantiles of each batch (EMA)."""

    def __init__(self, scheme: QuantScheme, percentile: float = 0.9999, ema_ratio: float = 0.9):
        super().__init__(scheme, ema_ratio)
        if not 0.5 < percentile <= 1.0:
            raise ValueError(f"percentile must be in (0.5, 1], got {percentile}")
        self.percentile = percentile

    def _batch_range(self, x2d: torch.Tensor):
        if x2d.shape[1] > _MAX_SAMPLES:
            x2d = x2d[:, :: (x2d.shape[1] + _MAX_SAMPLES - 1) // _MAX_SAMPLES]
        n = x2d.shape[1]
        k_hi = max(1, min(n, int(round(self.percentile * n))))
        k_lo = max(1, min(n, n - k_hi + 1))
        hi = torch.kthvalue(x2d, k_hi, dim=1).values
        lo = torch.kthvalue(x2d, k_lo, dim=1).values
        return lo, hi
