"""DoReFa weight quantization (Zhou et al. 2016): w -> tanh(w) / max|tanh(w)|, then uniform."""
from __future__ import annotations

import torch

from .fixed import FixedFakeQuantize


class DoReFaFakeQuantize(FixedFakeQuantize):
    """For weights: the tanh normalisation is part of the model, so export applies it too."""

    def export_transform(self, x):
        t = torch.tanh(x)
        return t / (t.abs().max() + 1e-5)

    def forward(self, x):
        return super().forward(self.export_transform(x))
