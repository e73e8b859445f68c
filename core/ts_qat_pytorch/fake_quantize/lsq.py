"""LSQ (learned step size, Esser et al. 2020) and LSQ+ (learned offset, Bhalgat et al. 2020)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..observer import EPS, LSQObserver
from ..observer.base import adopt_saved_shapes
from . import cpu_kernels
from .base import QuantizeBase


class LearnableFakeQuantize(QuantizeBase):
    """LSQ: the scale is a parameter trained by backprop; the zero point is a fixed integer.

    Gradients are those of torch's learnable fake-quant kernels, with LSQ's gradient scale
    1 / sqrt(numel_per_scale * quant_max); on the CPU a fused kernel computes them (``cpu_kernels``).
    """

    learn_zero_point = False

    def __init__(self, scheme, observer=LSQObserver, use_grad_scaling: bool = True, channels: int = 1):
        super().__init__(scheme, observer)
        self.use_grad_scaling = use_grad_scaling
        n = channels if scheme.per_channel else 1
        self.scale = nn.Parameter(torch.ones(n))
        zp = torch.zeros(n)
        if self.learn_zero_point:
            self.zero_point = nn.Parameter(zp)
        else:
            self.register_buffer("zero_point", zp)

    def _adopt_qparams(self, scale, zero_point):
        scale, zero_point = scale.reshape(-1).float(), zero_point.reshape(-1).float()
        if self.max_scale is not None:
            scale = scale.clamp(max=self.max_scale)
        # Keep the same Parameter objects (an optimizer may already hold them).
        if self.scale.shape != scale.shape:
            self.scale.data = scale.clone()
            self.zero_point.data = zero_point.clone()
        else:
            self.scale.data.copy_(scale)
            self.zero_point.data.copy_(zero_point)

    def fake_quant(self, x):
        scale, zero_point = self.scale, self.zero_point
        if self.training:
            # Keep the learned scale valid (positive, under the activation's bound) in place: cheap.
            scale.data.clamp_(min=EPS, max=self.max_scale)
            if self.learn_zero_point:
                zero_point.data.clamp_(self.quant_min, self.quant_max)
        else:
            # evaluation leaves the state alone (replicas that evaluate and replicas that don't stay identical)
            scale = scale.clamp(min=EPS, max=self.max_scale)
            if self.learn_zero_point:
                zero_point = zero_point.clamp(self.quant_min, self.quant_max)
        if self.use_grad_scaling:
            grad_factor = 1.0 / math.sqrt(x.numel() / self.scale.numel() * self.quant_max)
        else:
            grad_factor = 1.0
        if cpu_kernels.usable_for(x, self.ch_axis >= 0):
            return cpu_kernels.fake_quant_learnable(x, scale, zero_point, self.ch_axis, self.quant_min,
                                                    self.quant_max, grad_factor)
        if self.ch_axis >= 0:
            return torch._fake_quantize_learnable_per_channel_affine(
                x, scale, zero_point, self.ch_axis, self.quant_min, self.quant_max, grad_factor)
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, scale, zero_point, self.quant_min, self.quant_max, grad_factor)

    def qparams(self):
        # the values the forward uses: an optimizer step may have left the raw parameter out of range
        scale = self.scale.detach().clamp(min=EPS, max=self.max_scale)
        zp = torch.clamp(torch.round(self.zero_point.detach()), self.quant_min, self.quant_max)
        return scale.reshape(-1).clone(), zp.reshape(-1).int()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adopt_saved_shapes(self, state_dict, prefix, ("scale", "zero_point"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LSQPlusFakeQuantize(LearnableFakeQuantize):
    """LSQ+: scale and zero point are both learned (the zero point is rounded in the forward)."""

    learn_zero_point = True
