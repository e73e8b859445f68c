"""Range clipped to mean +- k standard deviations (the ancestor's ClipStdObserver)."""
from __future__ import annotations

import torch

from ..scheme import QuantScheme
from .minmax import EMAMinMaxObserver


class ClipStdObserver(EMAMinMaxObserver):
    """Each batch contributes [max(min, mean - k*std), min(max, mean + k*std)] (per tensor or per channel),
    k = ``std_scale``; batches combine by exponential moving average. Outliers beyond k standard deviations
    are clipped instead of stretching the grid.

    ``std_scale`` keeps the ancestor's keyword and default (2.6). The ancestor took the wider of the two
    ranges, which is plain min / max for any tensor with outliers; this one clips, as its name says.
    """

    def __init__(self, scheme: QuantScheme, std_scale: float = 2.6, ema_ratio: float = 0.9):
        super().__init__(scheme, ema_ratio)
        if not std_scale > 0:
            raise ValueError(f"std_scale must be positive, got {std_scale}")
        self.std_scale = float(std_scale)

    def _batch_range(self, x2d: torch.Tensor):
        bmin, bmax = torch.aminmax(x2d, dim=1)
        std, mean = torch.std_mean(x2d, dim=1, correction=0)  # correction 0: one value has std 0, not NaN
        return torch.maximum(bmin, mean - self.std_scale * std), torch.minimum(bmax, mean + self.std_scale * std)
