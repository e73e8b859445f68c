"""Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019, section 4.1): the numerics on two layers and on a chain of them.

For layer 1 -> (ReLU or nothing) -> layer 2, with r1_i the range of layer 1's output channel i and r2_i the range
of layer 2's input channel i, the scale

    s_i = sqrt(r1_i * r2_i) / r2_i

divides layer 1's output channel i (weights and bias) and multiplies layer 2's input channel i, after which both
ranges are sqrt(r1_i * r2_i). ReLU(x / s) = ReLU(x) / s for s > 0, so the network computes the same function.
Ranges are max |w| (the paper's symmetric range up to a factor 2, which cancels). A grouped layer 2 (depthwise:
groups = channels) has input channel i in group i // (in / groups); for a depthwise layer the scale passes through
channel-wise: its input channel i is its output channel i. A chain of three or more layers is equalized pairwise,
repeatedly, until the scales stop moving (the paper's iterative procedure).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["channel_groups", "out_ranges", "in_ranges", "range_ratios", "equalize_pair", "equalize_chain"]


def channel_groups(layer: nn.Module) -> tuple[int, int, int]:
    """(groups, output channels per group, input channels per group)."""
    w = layer.weight
    g = 1 if isinstance(layer, nn.Linear) else layer.groups
    return g, w.shape[0] // g, w.shape[1]


def out_ranges(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().float().abs().flatten(1).amax(1)


def in_ranges(layer: nn.Module) -> torch.Tensor:
    g, opg, ipg = channel_groups(layer)
    return layer.weight.detach().float().abs().reshape(g, opg, ipg, -1).amax(dim=(1, 3)).reshape(-1)


def range_ratios(r: torch.Tensor) -> tuple[float, float]:
    """(mean, min) of each channel's range over the tensor's range: 1.0 when every channel uses the whole range
    one per-tensor quantization grid covers."""
    top = float(r.max())
    if top <= 0:
        return 1.0, 1.0
    return float(r.mean()) / top, float(r.min()) / top


@torch.no_grad()
def _scale_out(layer: nn.Module, s: torch.Tensor) -> None:
    """Output channel i of ``layer`` (weights and bias) times s_i."""
    w = layer.weight
    w.copy_(w * s.to(w).reshape([-1] + [1] * (w.dim() - 1)))
    if layer.bias is not None:
        layer.bias.copy_(layer.bias * s.to(layer.bias))


@torch.no_grad()
def _scale_in(layer: nn.Module, s: torch.Tensor) -> None:
    """Input channel i of ``layer`` times s_i."""
    w = layer.weight
    g, opg, ipg = channel_groups(layer)
    w.copy_((w.reshape(g, opg, ipg, -1) * s.to(w).reshape(g, 1, ipg, 1)).reshape(w.shape))


def pair_scales(layer1: nn.Module, layer2: nn.Module) -> torch.Tensor:
    r1, r2 = out_ranges(layer1), in_ranges(layer2)
    ok = (r1 > 0) & (r2 > 0)
    return torch.where(ok, torch.sqrt(r1 * r2) / torch.where(ok, r2, torch.ones_like(r2)), torch.ones_like(r1))


def equalize_pair(layer1: nn.Module, layer2: nn.Module) -> torch.Tensor:
    """Equalize ``layer1`` -> ``layer2`` in place; returns s (layer 1's output channels were divided by it)."""
    s = pair_scales(layer1, layer2)
    _scale_out(layer1, 1.0 / s)
    _scale_in(layer2, s)
    return s


def equalize_chain(layers: list[nn.Module], max_iterations: int = 20, tolerance: float = 1e-4
                   ) -> tuple[int, bool, list[torch.Tensor]]:
    """Equalize consecutive pairs of ``layers`` until every scale of a sweep is within ``tolerance`` of 1.

    Returns (sweeps, converged, [per layer: the product of the scales its output channels were divided by]); the
    last layer's outputs are never scaled."""
    divided = [torch.ones(layer.weight.shape[0]) for layer in layers]
    for sweep in range(1, max_iterations + 1):
        worst = 0.0
        for i in range(len(layers) - 1):
            s = equalize_pair(layers[i], layers[i + 1])
            divided[i] = divided[i] * s.cpu()
            worst = max(worst, float((s - 1).abs().max()))
        if worst <= tolerance:
            return sweep, True, divided
    return max_iterations, False, divided
