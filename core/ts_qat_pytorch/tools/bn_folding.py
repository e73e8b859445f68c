"""BatchNorm folding of a float model: conv -> BN and linear -> BatchNorm1d become one layer with a bias.

    model, report = fold_bn(model, example_inputs)

With the BN's running statistics (eval-mode semantics) ``s = gamma / sqrt(var + eps)``:

    W' = W * s (per output channel)        b' = (b - running_mean) * s + beta

The BN module is replaced by ``nn.Identity`` (the model keeps its class and its other module names; prepare_by_platform
drops the Identity, so conv -> ReLU still fuses). A layer without a bias gets one. The folded model has no BN to train:
QAT then trains the folded layers directly.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch
from torch import fx, nn

from ..custom_quantizer.model_quantizer import _set_module
from ..nn.qat.fused import bn_scale
from . import output_check as oc
from .patterns import layer_batch_norms, trace

logger = logging.getLogger(__name__)

__all__ = ["fold_bn", "FoldReport", "BNStats", "fold_pairs", "foldable"]


@dataclass(frozen=True)
class BNStats:
    """The folded BN's output distribution per channel (mean ``beta``, standard deviation ``|gamma|``): what
    high-bias absorption needs after folding."""

    mean: torch.Tensor
    std: torch.Tensor


@dataclass(frozen=True)
class FoldReport:
    folded: tuple[tuple[str, str], ...]                    # (layer, BatchNorm) pairs
    not_folded: tuple[tuple[str, str], ...]                # (BatchNorm, why)
    output_change: float                                   # relative, on the example input (float error only)
    stats: dict = field(default_factory=dict, repr=False)  # layer -> BNStats (not in to_dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("stats")
        d["folded"] = [list(p) for p in self.folded]
        d["not_folded"] = [list(p) for p in self.not_folded]
        return d


@torch.no_grad()
def fold_pairs(model: nn.Module, pairs: Iterable[tuple[str, str]]) -> dict[str, BNStats]:
    """Fold each (layer, BatchNorm) of ``model`` in place; {layer: BNStats}."""
    stats = {}
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        w = layer.weight
        s = bn_scale(bn).detach().float().to(w.device)
        w.mul_(s.reshape([-1] + [1] * (w.dim() - 1)).to(w.dtype))
        bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros_like(s)
        beta = bn.bias.detach().float() if bn.affine else torch.zeros_like(s)
        new = (bias - bn.running_mean.detach().float()) * s + beta
        if layer.bias is None:
            layer.bias = nn.Parameter(new.to(w.dtype), requires_grad=w.requires_grad)
        else:
            layer.bias.copy_(new.to(layer.bias.dtype))
        gamma = bn.weight.detach().float().abs() if bn.affine else torch.ones_like(s)
        stats[layer_name] = BNStats(beta.clone(), gamma.clone())
        _set_module(model, bn_name, nn.Identity())
    return stats


def foldable(gm: fx.GraphModule, example_inputs) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """([(layer, BatchNorm)] to fold, [(BatchNorm, why not)] for the others) in the trace ``gm``."""
    pairs, skipped = layer_batch_norms(gm)
    pairs, bad = _linear_pairs_ok(gm, pairs, example_inputs)
    return pairs, skipped + bad


def _linear_pairs_ok(gm: fx.GraphModule, pairs, example_inputs) -> tuple[list, list]:
    """Linear -> BatchNorm1d folds only on (N, C) outputs (on (N, L, C) the BN's channels are L): checked on the
    example's shapes. Returns (pairs kept, [(BatchNorm, why)])."""
    if not any(isinstance(gm.get_submodule(layer), nn.Linear) for layer, _ in pairs):
        return list(pairs), []
    shapes = {}

    def hook(name):
        def fn(_mod, _inp, out):
            shapes[name] = tuple(out.shape)
        return fn

    handles = [gm.get_submodule(layer).register_forward_hook(hook(layer)) for layer, _ in pairs
               if isinstance(gm.get_submodule(layer), nn.Linear)]
    try:
        oc.outputs(gm, example_inputs)
    finally:
        for h in handles:
            h.remove()
    kept, skipped = [], []
    for layer, bn in pairs:
        if isinstance(gm.get_submodule(layer), nn.Linear) and len(shapes.get(layer, ())) != 2:
            skipped.append((bn, f"'{layer}' outputs {shapes.get(layer)}: BatchNorm1d normalizes dimension 1, not "
                                "the Linear's features"))
        else:
            kept.append((layer, bn))
    return kept, skipped


def fold_bn(model: nn.Module, example_inputs, leaf_module: Iterable = ()) -> tuple[nn.Module, FoldReport]:
    """A copy of the float ``model`` with every foldable BatchNorm folded into the conv / linear layer before it
    (see the module docstring) and replaced by ``nn.Identity``; the input model is not modified.

    example_inputs  a tensor or a tuple of the model's inputs: the shapes of linear -> BatchNorm1d pairs are checked
                    on it, and the outputs before and after folding compared (``report.output_change``).
    leaf_module     module types or names the tracer does not enter (as prepare_by_platform's ``leaf_module``).

    A BatchNorm not directly after a layer called once, or whose layer's output is read elsewhere too, is left as
    it is and listed in ``report.not_folded`` with the reason.
    """
    model = copy.deepcopy(model)
    training = model.training
    model.eval()
    pairs, skipped = foldable(trace(model, leaf_module), example_inputs)
    before = oc.outputs(model, example_inputs)
    stats = fold_pairs(model, pairs)
    change = oc.relative_change(before, oc.outputs(model, example_inputs))
    oc.check_exact("BatchNorm folding", change)
    model.train(training)
    logger.info("folded %d BatchNorms (%d left: %s)", len(pairs), len(skipped),
                ", ".join(n for n, _ in skipped) or "none")
    return model, FoldReport(tuple(pairs), tuple(skipped), change, stats)
