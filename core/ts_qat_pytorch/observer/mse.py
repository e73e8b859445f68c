from __future__ import annotations

import torch

from ..scheme import QuantScheme
from .base import ObserverBase, qparams_from_minmax
from .minmax import EMAMinMaxObserver

_GRID = 40  # candidate clipping ratios between 1/_GRID and 1


def mse_best_range(x2d: torch.Tensor, scheme: QuantScheme):
    """Per row, the [lo, hi] = ratio * [min, max] whose quantization has the least squared error."""
    bmin, bmax = torch.aminmax(x2d, dim=1)
    best_err = torch.full_like(bmin, float("inf"))
    best_lo, best_hi = bmin.clone(), bmax.clone()
    for i in range(_GRID, 0, -1):
        r = i / _GRID
        lo, hi = bmin * r, bmax * r
        scale, zp = qparams_from_minmax(lo, hi, scheme)
        s, z = scale.unsqueeze(1), zp.unsqueeze(1).float()
        q = torch.clamp(torch.round(x2d / s) + z, scheme.quant_min, scheme.quant_max)
        err = ((q - z) * s - x2d).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


class MSEObserver(ObserverBase):
    """Per batch, the clipping range with least quantization MSE; min / max over batches."""

    def _batch_range(self, x2d):
        return mse_best_range(x2d, self.scheme)


class EMAMSEObserver(EMAMinMaxObserver):
    """Per batch, the least-MSE clipping range; exponential moving average over batches."""

    def _batch_range(self, x2d):
        return mse_best_range(x2d, self.scheme)
