"""DSQ: Differentiable Soft Quantization (Gong et al. 2019).

In training the rounding step is replaced, for the backward pass, by a tanh-shaped staircase whose sharpness
is set by ``alpha`` (the characteristic variable of the paper, in (0, 1); smaller is closer to rounding).
Within each step, with u the input on the integer grid, i = floor(u) and f = u - i - 0.5 in [-0.5, 0.5):

    soft(u) = i + 0.5 + 0.5 * tanh(k * f) / (1 - alpha),   k = log(2 / alpha - 1)

which meets the steps' ends exactly (tanh(k / 2) = 1 - alpha). The forward value is the hard rounding, the
gradient is soft's, and the scale is learned. In evaluation and export it is ordinary fake quantization with the
learned scale, so the ONNX file computes what evaluation computes.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..observer import EPS, MinMaxObserver
from ..observer.base import adopt_saved_shapes
from .base import QuantizeBase


def soft_round(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """round(u) in the forward pass, the DSQ staircase's gradient in the backward pass."""
    k = math.log(2.0 / alpha - 1.0)
    i = torch.floor(u).detach()
    soft = i + 0.5 + 0.5 * torch.tanh(k * (u - i - 0.5)) / (1.0 - alpha)
    return soft + (torch.round(u) - soft).detach()


class DSQFakeQuantize(QuantizeBase):
    """DSQ with a learned scale (initialised by the observer) and a fixed integer zero point."""

    def __init__(self, scheme, observer=MinMaxObserver, alpha: float = 0.4, channels: int = 1):
        super().__init__(scheme, observer)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"DSQFakeQuantize: alpha must be within (0, 1), got {alpha}")
        self.alpha = float(alpha)
        n = channels if scheme.per_channel else 1
        self.scale = nn.Parameter(torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n))

    def _adopt_qparams(self, scale, zero_point):
        scale, zero_point = scale.reshape(-1).float(), zero_point.reshape(-1).float()
        if self.max_scale is not None:
            scale = scale.clamp(max=self.max_scale)
        if self.scale.shape != scale.shape:  # keep the Parameter object (an optimizer may hold it)
            self.scale.data = scale.clone()
            self.zero_point = zero_point.clone()
        else:
            self.scale.data.copy_(scale)
            self.zero_point.copy_(zero_point)

    def fake_quant(self, x):
        if not self.training:  # hard quantization, exactly what the export writes
            scale, zp = self.qparams()
            if self.ch_axis >= 0:
                return torch.fake_quantize_per_channel_affine(x, scale, zp, self.ch_axis, self.quant_min,
                                                              self.quant_max)
            return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), self.quant_min, self.quant_max)
        self.scale.data.clamp_(min=EPS, max=self.max_scale)
        scale, zp = self.broadcast(self.scale, x), self.broadcast(self.zero_point, x)
        u = torch.clamp(x / scale + zp, self.quant_min, self.quant_max)
        return (soft_round(u, self.alpha) - zp) * scale

    def qparams(self):
        scale = self.scale.detach().clamp(min=EPS, max=self.max_scale)
        zp = torch.clamp(torch.round(self.zero_point), self.quant_min, self.quant_max)
        return scale.reshape(-1).clone(), zp.reshape(-1).int()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adopt_saved_shapes(self, state_dict, prefix, ("scale", "zero_point"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"
