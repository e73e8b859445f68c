from __future__ import annotations

import torch

from ..observer.base import adopt_saved_shapes
from . import cpu_kernels
from .base import QuantizeBase


class FixedFakeQuantize(QuantizeBase):
    """Observer-driven fake quantization: qparams come from the observer, nothing is learned."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("scale", torch.tensor([1.0]))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int32))

    def _adopt_qparams(self, scale, zero_point):
        scale, zero_point = scale.reshape(-1), zero_point.reshape(-1)
        if self.max_scale is not None:
            scale = scale.clamp(max=self.max_scale)
        if self.scale.shape != scale.shape:
            self.scale = torch.empty_like(scale)
            self.zero_point = torch.empty_like(zero_point)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def fake_quant(self, x):
        if cpu_kernels.usable_for(x, self.ch_axis >= 0):
            return cpu_kernels.fake_quant_fixed(x, self.scale, self.zero_point, self.ch_axis, self.quant_min,
                                                self.quant_max)
        if self.ch_axis >= 0:
            return torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point, self.ch_axis, self.quant_min, self.quant_max)
        return torch.fake_quantize_per_tensor_affine(
            x, self.scale, self.zero_point, self.quant_min, self.quant_max)

    def qparams(self):
        return self.scale.detach().reshape(-1), self.zero_point.detach().reshape(-1).int()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adopt_saved_shapes(self, state_dict, prefix, ("scale", "zero_point"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
