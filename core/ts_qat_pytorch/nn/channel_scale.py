"""ChannelScale: ``x * scale`` along the last dimension, a float layer that the float tools insert.

SmoothQuant (``ts_qat_pytorch.tools.smooth_quant``) divides a LayerNorm's output channels by ``s`` so that the Linear
layers reading it see a narrower range; in a post-LayerNorm encoder (BERT, MiniLM) the same output is also the
residual stream, which must keep the original values: a ChannelScale(s) in front of those other readers restores
them exactly. It is a leaf of the quantization tracer and stays float (exported as one Mul); its ``scale`` is a
buffer, so checkpoints carry it.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelScale"]


class ChannelScale(nn.Module):
    """``x * scale`` with ``scale`` of shape (channels,) broadcast over the last dimension."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}"
