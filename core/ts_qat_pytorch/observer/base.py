"""Observers: collect statistics of a tensor and turn them into (scale, zero_point)."""
from __future__ import annotations

import torch
from torch import nn

from ..scheme import QuantScheme

# Smallest scale ever produced: a zero-range tensor (all zeros, a constant) must never give a
# zero, NaN or infinite scale.
EPS = torch.finfo(torch.float32).eps


def _reduce_dims(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """View ``x`` as (channels, -1) for per-channel schemes, (1, -1) otherwise."""
    if scheme.per_channel:
        return x.transpose(0, scheme.ch_axis).reshape(x.shape[scheme.ch_axis], -1)
    return x.reshape(1, -1)


def qparams_from_minmax(min_val: torch.Tensor, max_val: torch.Tensor, scheme: QuantScheme):
    """(scale, zero_point) covering [min_val, max_val] (which always includes 0)."""
    min_val = torch.clamp(min_val, max=0.0)
    max_val = torch.clamp(max_val, min=0.0)
    qmin, qmax = scheme.quant_min, scheme.quant_max
    if scheme.symmetry:
        absmax = torch.maximum(-min_val, max_val)
        scale = absmax / (qmax if scheme.signed else qmax - qmin)
        scale = torch.clamp(scale, min=EPS)
        if scheme.pot_scale:
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        zero_point = torch.full_like(scale, 0 if scheme.signed else qmin)
    else:
        scale = torch.clamp((max_val - min_val) / (qmax - qmin), min=EPS)
        if scheme.pot_scale:
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        zero_point = torch.clamp(qmin - torch.round(min_val / scale), qmin, qmax)
    return scale.float(), zero_point.round().int()


def adopt_saved_shapes(module: nn.Module, state_dict, prefix: str, names) -> None:
    """Before loading: resize buffers / parameters whose size comes from the data (per-channel statistics,
    scales) to the saved shapes. Parameters keep their identity (an optimizer may hold them)."""
    for name in names:
        key = prefix + name
        cur = getattr(module, name)
        if key in state_dict and cur.shape != state_dict[key].shape:
            if name in module._parameters:
                cur.data = torch.empty_like(state_dict[key])
            else:
                setattr(module, name, torch.empty_like(state_dict[key]))


class ObserverBase(nn.Module):
    """Tracks ``min_val`` / ``max_val`` (per tensor or per channel) and returns qparams.

    Subclasses override :meth:`_batch_range` (what one batch contributes) and/or
    :meth:`_merge` (how batches combine). Empty inputs are ignored, and so are inputs holding NaN or inf
    (they would reset the statistics; the fake quantizer says which one saw them).
    """

    def __init__(self, scheme: QuantScheme):
        super().__init__()
        self.scheme = scheme
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @property
    def initialized(self) -> bool:
        return bool(torch.isfinite(self.min_val).all()) and self.min_val.numel() > 0

    def _batch_range(self, x2d: torch.Tensor):
        return torch.aminmax(x2d, dim=1)

    def _merge(self, bmin: torch.Tensor, bmax: torch.Tensor):
        if not self.initialized or self.min_val.shape != bmin.shape:
            self.min_val = bmin
            self.max_val = bmax
        else:
            self.min_val = torch.minimum(self.min_val, bmin)
            self.max_val = torch.maximum(self.max_val, bmax)

    @staticmethod
    def usable(x: torch.Tensor) -> bool:
        """Whether a batch may update the statistics: not empty, every value finite."""
        return x.numel() > 0 and bool(torch.isfinite(x).all())

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.usable(x):
            return x
        x2d = _reduce_dims(x.detach().float(), self.scheme)
        if x2d.shape[1] == 0:
            return x
        bmin, bmax = self._batch_range(x2d)
        if not self.scheme.per_channel:
            bmin, bmax = bmin.reshape(()), bmax.reshape(())
        self._merge(bmin, bmax)
        return x

    def calculate_qparams(self):
        if not self.initialized:
            raise RuntimeError(
                f"{type(self).__name__} has seen no data: run calibration batches "
                "(utils.state.enable_calibration, then forward passes) before asking for qparams")
        return qparams_from_minmax(self.min_val, self.max_val, self.scheme)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adopt_saved_shapes(self, state_dict, prefix, ("min_val", "max_val"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"bit={self.scheme.bit}, symmetry={self.scheme.symmetry}, per_channel={self.scheme.per_channel}"
