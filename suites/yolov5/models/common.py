"""YOLOv5 building blocks, written here from the published architecture (conv + BN + activation units,
cross-stage-partial bottlenecks, spatial pyramid pooling).

Taken as facts: the block layouts and the attribute names of the published checkpoints (``conv``/``bn``/``act``,
``cv1``..``cv4``, ``m``, ``add``, ``d``), because their state_dict keys and pickled objects name them, and the
BatchNorm settings (eps 1e-3, momentum 0.03). The positional constructor arguments follow the YAML rows' ``args``.

Activations: SiLU by default; the v3.0 configs used Hardswish (``act: hardswish`` in the YAML, applied with
``default_activation``); the CSP bottleneck's own activation is LeakyReLU(0.1)."""
from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
import torch.nn as nn

ACTIVATIONS = {"silu": nn.SiLU, "hardswish": nn.Hardswish, "leakyrelu": functools.partial(nn.LeakyReLU, 0.1),
               "relu": nn.ReLU}
BN_EPS, BN_MOMENTUM = 1e-3, 0.03
_activation = contextvars.ContextVar("yolov5_activation", default="silu")


@contextlib.contextmanager
def default_activation(name: str):
    """Blocks built inside this context use activation ``name`` where their row says ``act=True``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}' (known: {', '.join(ACTIVATIONS)})")
    token = _activation.set(name)
    try:
        yield
    finally:
        _activation.reset(token)


def _activation_for(act) -> nn.Module:
    if act is True:
        return ACTIVATIONS[_activation.get()]()
    return act if isinstance(act, nn.Module) else nn.Identity()


def same_padding(kernel):
    """Padding that keeps the spatial size at stride 1 (odd kernels)."""
    return [k // 2 for k in kernel] if isinstance(kernel, (list, tuple)) else kernel // 2


def _norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class Conv(nn.Module):
    """The basic unit: Conv2d without bias, BatchNorm2d, activation."""

    def __init__(self, in_ch, out_ch, kernel=1, stride=1, padding=None, groups=1, act=True):
        super().__init__()
        pad = same_padding(kernel) if padding is None else padding
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, pad, groups=groups, bias=False)
        self.bn = _norm(out_ch)
        self.act = _activation_for(act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Focus(nn.Module):
    """Space to depth (the v3.0 stem): the four pixel phases stacked on channels, then a Conv."""

    PHASES = ((0, 0), (1, 0), (0, 1), (1, 1))  # (row, column) offsets, in the channel order of the published weights

    def __init__(self, in_ch, out_ch, kernel=1, stride=1, padding=None, groups=1, act=True):
        super().__init__()
        self.conv = Conv(len(self.PHASES) * in_ch, out_ch, kernel, stride, padding, groups, act)

    def forward(self, x):
        return self.conv(torch.cat([x[..., r::2, c::2] for r, c in self.PHASES], 1))


class Bottleneck(nn.Module):
    """1x1 Conv to ``expansion x out_ch`` channels, 3x3 Conv back; a residual add when the shapes allow it."""

    def __init__(self, in_ch, out_ch, shortcut=True, groups=1, expansion=0.5):
        super().__init__()
        hidden = int(out_ch * expansion)
        self.cv1 = Conv(in_ch, hidden, 1, 1)
        self.cv2 = Conv(hidden, out_ch, 3, 1, groups=groups)
        self.add = bool(shortcut) and in_ch == out_ch

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


def _bottlenecks(channels: int, repeats: int, shortcut, groups) -> nn.Sequential:
    return nn.Sequential(*[Bottleneck(channels, channels, shortcut, groups, expansion=1.0) for _ in range(repeats)])


class BottleneckCSP(nn.Module):
    """Cross-stage partial block of the v3.0 layout: a bottleneck path and a plain 1x1 path, joined by BN,
    LeakyReLU and a Conv."""

    def __init__(self, in_ch, out_ch, repeats=1, shortcut=True, groups=1, expansion=0.5):
        super().__init__()
        hidden = int(out_ch * expansion)
        # creation order = the parameters' initialisation order (a seeded model from scratch stays the same)
        self.cv1 = Conv(in_ch, hidden, 1, 1)
        self.cv2 = nn.Conv2d(in_ch, hidden, 1, 1, bias=False)
        self.cv3 = nn.Conv2d(hidden, hidden, 1, 1, bias=False)
        self.cv4 = Conv(2 * hidden, out_ch, 1, 1)
        self.bn = _norm(2 * hidden)
        self.act = nn.LeakyReLU(0.1)
        self.m = _bottlenecks(hidden, repeats, shortcut, groups)

    def forward(self, x):
        deep = self.cv3(self.m(self.cv1(x)))
        joined = torch.cat((deep, self.cv2(x)), 1)
        return self.cv4(self.act(self.bn(joined)))


class C3(nn.Module):
    """Cross-stage partial block with three Convs (v4.0 and later): bottleneck path and 1x1 path, concatenated,
    fused by a 1x1 Conv."""

    def __init__(self, in_ch, out_ch, repeats=1, shortcut=True, groups=1, expansion=0.5):
        super().__init__()
        hidden = int(out_ch * expansion)
        self.cv1 = Conv(in_ch, hidden, 1, 1)
        self.cv2 = Conv(in_ch, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, out_ch, 1)
        self.m = _bottlenecks(hidden, repeats, shortcut, groups)

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPP(nn.Module):
    """Spatial pyramid pooling: the halved input beside its stride-1 max pools of each kernel size."""

    def __init__(self, in_ch, out_ch, kernels=(5, 9, 13)):
        super().__init__()
        hidden = in_ch // 2
        self.cv1 = Conv(in_ch, hidden, 1, 1)
        self.cv2 = Conv(hidden * (len(kernels) + 1), out_ch, 1, 1)
        self.m = nn.ModuleList([nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2) for k in kernels])

    def forward(self, x):
        x = self.cv1(x)
        return self.cv2(torch.cat([x, *(pool(x) for pool in self.m)], 1))


class SPPF(nn.Module):
    """SPP with one pool applied three times in a row: 5, 9 and 13 wide receptive fields from one 5x5 pool."""

    def __init__(self, in_ch, out_ch, kernel=5):
        super().__init__()
        hidden = in_ch // 2
        self.cv1 = Conv(in_ch, hidden, 1, 1)
        self.cv2 = Conv(hidden * 4, out_ch, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=kernel, stride=1, padding=kernel // 2)

    def forward(self, x):
        pyramid = [self.cv1(x)]
        for _ in range(3):
            pyramid.append(self.m(pyramid[-1]))
        return self.cv2(torch.cat(pyramid, 1))


class Concat(nn.Module):
    """Concatenates the list of inputs a row names along dimension ``d``."""

    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, xs):
        return torch.cat(xs, self.d)
