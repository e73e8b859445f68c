"""Fused QAT layers: conv / linear + BatchNorm (+ activation), BN folded while training.

The weight is fake-quantized *after* folding the BN scale into it, exactly as it will be deployed
(Jacob et al. 2018, Krishnamoorthi 2018):

    s   = gamma / sqrt(running_var + eps)
    y   = conv(x, fq(W * s)) / s  (+ b)      then BatchNorm(y) with batch statistics while training,
                                            running statistics in eval or once frozen.

While training on the CPU, the rescale, BatchNorm and a ReLU / ReLU6 after it run as one kernel on the
convolution's output (``cpu_kernels.folded_batch_norm``: BatchNorm undoes the per-channel scale but for eps).

In eval mode, and once ``freeze_bn_stats`` stops the BN statistics from moving (late in QAT), the
layer computes the deployed folded form directly: conv(x, fq(W * s)) + (b - mean) * s + beta.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...fake_quantize.cpu_kernels import divide_channels, folded_batch_norm, multiply_channels
from .modules import Conv1d, Conv2d, ConvTranspose1d, ConvTranspose2d, Linear, deployed_bias


def bn_scale(bn: nn.Module) -> torch.Tensor:
    """gamma / sqrt(running_var + eps) (1 / sqrt(...) without affine): what folding multiplies each channel by."""
    std = torch.sqrt(bn.running_var + bn.eps)
    return bn.weight / std if bn.affine else 1.0 / std


class _FusedMixin:
    """Adds an optional BatchNorm (folded) and an optional activation to a QAT layer."""

    def _setup_fusion(self, bn: nn.Module | None, act: nn.Module | None, bn_name: str | None):
        if bn is not None and isinstance(self, (ConvTranspose1d, ConvTranspose2d)) and self.groups != 1:
            raise ValueError("folding BatchNorm into a grouped ConvTranspose is not supported; exclude the "
                             "layer (extra_quantizer_dict={'exclude_module_name': [...]})")
        self.bn = bn
        self.act = act
        self.bn_name = bn_name  # where the BN lived in the float model (for the float state_dict)
        self.bn_frozen = False

    def freeze_bn_stats(self, frozen: bool = True):
        self.bn_frozen = frozen
        return self

    def _bn_scale(self) -> torch.Tensor:
        return bn_scale(self.bn)

    def _out_view(self, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return s.reshape([1, -1] + [1] * (y.dim() - 2))


    def forward(self, x):
        if self.bn is None:
            w = self.weight_fake_quant(self.weight)
            y = self._raw(x, w, self._deployed_bias(self.bias))
        elif self.bn_frozen or not self.training:
            # running statistics: compute exactly what is deployed (folded weight, int32 folded bias), so that
            # evaluation here and in onnxruntime see the same numbers
            w, b = self._folded()
            w = self.weight_fake_quant(w)
            y = self._raw(x, w, self._deployed_bias(b))
        else:
            s = self._bn_scale()
            y = self._raw(x, self.weight_fake_quant(multiply_channels(self.weight, s, self.weight_ch_axis)), None)
            shape = y.shape
            if isinstance(self, nn.Linear) and y.dim() > 2:  # tokens (Linear -> flatten -> BatchNorm1d): one
                y = y.reshape(-1, shape[-1])  # BatchNorm over all leading dimensions, channels last
            return self._batch_norm_train(y, s).reshape(shape)
        return self.act(y) if self.act is not None else y

    def _batch_norm_train(self, y, s):
        """BatchNorm with batch statistics of the layer's output y = raw(x, W * s), then the activation."""
        fused = folded_batch_norm(y, s, self.bias, self.bn, self.act)  # the CPU kernel: rescale, BN, ReLU(6)
        if fused is not None:
            y, act_done = fused
            return y if act_done else self.act(y)
        y = divide_channels(y, s)  # one pass backward on the CPU (fake_quantize/cpu_kernels.py)
        if self.bias is not None:
            y = y + self._out_view(self.bias, y)
        y = self.bn(y)
        return self.act(y) if self.act is not None else y

    def _deployed_bias(self, b):
        # ConvTranspose: onnxruntime has no integer kernel for it, its bias stays float
        return b if isinstance(self, (ConvTranspose1d, ConvTranspose2d)) else deployed_bias(self, b)

    def _folded(self):
        s = self._bn_scale()
        bias = self.bias if self.bias is not None else torch.zeros_like(self.bn.running_mean)
        beta = self.bn.bias if self.bn.affine else torch.zeros_like(bias)
        return multiply_channels(self.weight, s, self.weight_ch_axis), (bias - self.bn.running_mean) * s + beta

    @torch.no_grad()
    def quantized_weight_source(self):
        if self.bn is None:
            return self.weight, self.bias
        return self._folded()

    @classmethod
    def from_modules(cls, layer: nn.Module, bn: nn.Module | None, act: nn.Module | None, weight_fake_quant,
                     bn_name: str | None = None):
        qmod = cls.from_float(layer, weight_fake_quant)
        qmod._setup_fusion(bn, act, bn_name)
        return qmod

    def extra_repr(self):
        return super().extra_repr() + (f", bn_frozen={self.bn_frozen}" if self.bn is not None else "")


class _ConvRaw:
    def _raw(self, x, w, b):
        return self._conv_forward(x, w, b)


class _ConvTRaw:
    def _raw(self, x, w, b):
        return self._transposed(x, w, b)


class _LinearRaw:
    def _raw(self, x, w, b):
        return F.linear(x, w, b)


def _make(name: str, raw: type, base: type) -> type:
    return type(name, (_FusedMixin, raw, base), {"__doc__": f"Fused QAT {name} (see module docstring)."})


# One class per documented pattern, so a printed model says what was fused.
ConvBn1d = _make("ConvBn1d", _ConvRaw, Conv1d)
ConvBnReLU1d = _make("ConvBnReLU1d", _ConvRaw, Conv1d)
ConvReLU1d = _make("ConvReLU1d", _ConvRaw, Conv1d)
ConvBn2d = _make("ConvBn2d", _ConvRaw, Conv2d)
ConvBnReLU2d = _make("ConvBnReLU2d", _ConvRaw, Conv2d)
ConvReLU2d = _make("ConvReLU2d", _ConvRaw, Conv2d)
ConvTransposeBn1d = _make("ConvTransposeBn1d", _ConvTRaw, ConvTranspose1d)
ConvTransposeBnReLU1d = _make("ConvTransposeBnReLU1d", _ConvTRaw, ConvTranspose1d)
ConvTransposeReLU1d = _make("ConvTransposeReLU1d", _ConvTRaw, ConvTranspose1d)
ConvTransposeBn2d = _make("ConvTransposeBn2d", _ConvTRaw, ConvTranspose2d)
ConvTransposeBnReLU2d = _make("ConvTransposeBnReLU2d", _ConvTRaw, ConvTranspose2d)
ConvTransposeReLU2d = _make("ConvTransposeReLU2d", _ConvTRaw, ConvTranspose2d)
LinearBn1d = _make("LinearBn1d", _LinearRaw, Linear)
LinearBnReLU1d = _make("LinearBnReLU1d", _LinearRaw, Linear)
LinearReLU = _make("LinearReLU", _LinearRaw, Linear)

FUSED_MODULES = (ConvBn1d, ConvBnReLU1d, ConvReLU1d, ConvBn2d, ConvBnReLU2d, ConvReLU2d, ConvTransposeBn1d,
                 ConvTransposeBnReLU1d, ConvTransposeReLU1d, ConvTransposeBn2d, ConvTransposeBnReLU2d,
                 ConvTransposeReLU2d, LinearBn1d, LinearBnReLU1d, LinearReLU)
