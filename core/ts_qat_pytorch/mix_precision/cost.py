"""What each quantized layer costs: weights (for model size) and multiply-accumulates per sample (for BOPs).

MACs come from one forward pass that records each layer's input and output shapes:
    conv            output elements x (in_channels / groups x kernel elements)
    conv transpose  input elements x (out_channels / groups x kernel elements)
    linear          output elements x in_features (any leading dimensions: tokens count)
    embedding       0 (a lookup)
BOPs of a layer = MACs x weight bits x activation bits (Baskin et al. / HAWQ-V3's bit operations).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..utils.calibrate import _default_forward, _device, _to
from ..utils.state import disable_all
from .sensitivity import quantized_layers

__all__ = ["LayerCost", "layer_costs"]


@dataclass(frozen=True)
class LayerCost:
    params: int     # quantized weights
    macs: int       # multiply-accumulates per sample


def _macs(mod: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    n = max(1, x.shape[0]) if x.dim() > 1 else 1
    w = mod.weight
    if isinstance(mod, nn.Embedding):
        return 0
    if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return int(x.numel() // n * (w.numel() // w.shape[0]))
    if isinstance(mod, nn.modules.conv._ConvNd):
        return int(y.numel() // n * (w.numel() // w.shape[0]))
    if isinstance(mod, nn.Linear):
        return int(y.numel() // n * w.shape[1])
    return int(y.numel() // n * (w.numel() // max(1, w.shape[0])))


def layer_costs(model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] | None = None
                ) -> dict[str, LayerCost]:
    """Weights and per-sample MACs of each quantized layer of a prepared model, from one forward of ``batch``
    (on a float copy; the model is not modified)."""
    fm = copy.deepcopy(model).eval()
    disable_all(fm)
    found: dict[str, LayerCost] = {}
    hooks = []
    for name in quantized_layers(fm):
        mod = fm.get_submodule(name)

        def hook(m, args, out, name=name):
            if name not in found:  # a layer called twice (shared weights) counts its first call
                found[name] = LayerCost(int(m.weight.numel()), _macs(m, args[0], out))
        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            (forward or _default_forward)(fm, _to(batch, _device(fm)))
    finally:
        for h in hooks:
            h.remove()
    for name in quantized_layers(fm):  # never called in this forward: it costs no operations
        found.setdefault(name, LayerCost(int(fm.get_submodule(name).weight.numel()), 0))
    return {n: found[n] for n in quantized_layers(fm)}
