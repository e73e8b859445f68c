"""``equalize``: the data-free float steps of Nagel et al. 2019 in one verb, on the float model before prepare.

    model, report = equalize(model, example_inputs)      # fold BN -> cross-layer equalization -> high-bias absorption
    q = prepare_by_platform(model, "TSQAT", {"extra_qconfig_dict": {"w_qscheme": {"per_channel": False}}})

1. BatchNorm folding (``bn_folding``): each conv / linear + BN becomes one layer; the BN statistics are kept for 3.
2. Cross-layer equalization (``cle``) of every chain conv -> [BN] -> [ReLU / ReLU6 / nothing] -> conv (also linear ->
   linear) whose values in between have no other reader; depthwise convs included, chains of three layers
   (mobilenet_v2's expand 1x1 -> depthwise 3x3 -> project 1x1) equalized pairwise until the scales settle.
   Per-channel weight ranges become alike, which is what per-tensor weight quantization needs.
3. High-bias absorption (``bias_absorption``) through each ReLU whose first layer had a BatchNorm.

ReLU6 (``relu6``). ReLU6 is not positive-homogeneous: relu6(x / s) is not relu6(x) / s, because in the scaled
domain the clip would have to sit at 6 / s_i, a different bound per channel that no deployed Conv + Clip has. The
only scale that keeps a ReLU6 exact for every input is s = 1, i.e. no equalization through it. So:

* ``relu6="relu"`` (default): every ReLU6 module on a link to be equalized is first replaced by ReLU (AIMET's
  practice for MobileNetV2). This changes the float model wherever a pre-activation exceeds 6; the report says
  where (``relu6_replaced``) and by how much on the example input (``output_change["relu6"]``), and the suites'
  runner evaluates the float model again after ``--cle``. Equalization itself is then exact. Chosen because
  MobileNetV2, the network CLE matters most for, has a ReLU6 on every expand and depthwise output: keeping them
  would leave nothing to equalize but its linear project -> expand links.
* ``relu6="keep"``: links through a ReLU6 are left alone (listed in ``skipped``); the model's function is unchanged.

On a ReLU network (``relu6`` then does nothing) steps 1 and 2 leave the outputs unchanged up to float error (checked
on the example input: ``output_change["fold_bn"]``, ``["cle"]``); step 3 is the paper's approximation
(``output_change["hba"]``). The input model is not modified.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..custom_quantizer.model_quantizer import _set_module
from . import output_check as oc
from .bias_absorption import absorb, absorption_amount
from .bn_folding import fold_pairs, foldable
from .cle import equalize_chain, in_ranges, out_ranges, range_ratios
from .patterns import Link, chains, layer_links, trace

logger = logging.getLogger(__name__)

__all__ = ["equalize", "EqualizeReport", "ChainResult", "LayerRanges", "AbsorbedBias", "RELU6_CHOICES"]

RELU6_CHOICES = ("relu", "keep")


@dataclass(frozen=True)
class LayerRanges:
    """One equalized layer's per-channel weight ranges over the tensor's range, (mean, min) of the channels, before
    and after: moving toward 1 is what equalization is for. ``out``: output channels; ``in``: input channels."""

    layer: str
    out_before: tuple[float, float]
    out_after: tuple[float, float]
    in_before: tuple[float, float]
    in_after: tuple[float, float]


@dataclass(frozen=True)
class ChainResult:
    layers: tuple[str, ...]
    activations: tuple[str | None, ...]    # between consecutive layers: "relu", "relu6 -> relu" or None
    sweeps: int
    converged: bool
    scale_range: tuple[float, float]       # (min, max) of the scales applied to the chain's channels


@dataclass(frozen=True)
class AbsorbedBias:
    layer1: str
    layer2: str
    channels: int          # channels with c > 0
    max_absorbed: float    # max c
    bias_max_before: float  # max |b1|
    bias_max_after: float


@dataclass(frozen=True)
class EqualizeReport:
    folded: tuple[tuple[str, str], ...]          # (layer, BatchNorm)
    not_folded: tuple[tuple[str, str], ...]      # (BatchNorm, why)
    relu6_replaced: tuple[str, ...]
    chains: tuple[ChainResult, ...]
    layers: tuple[LayerRanges, ...]
    absorbed: tuple[AbsorbedBias, ...]
    skipped: tuple[tuple[str, str], ...]         # (layer, why it was not equalized with the layer after it)
    output_change: dict = field(default_factory=dict)  # step -> relative output change on the example input

    def to_dict(self) -> dict:
        return asdict(self)

    def mean_ratio(self, when: str) -> float:
        """The layers' mean output-channel range ratio ``when`` "before" or "after" (1.0 = equal ranges)."""
        vals = [getattr(r, f"out_{when}")[0] for r in self.layers]
        return sum(vals) / len(vals) if vals else 1.0

    def summary(self) -> str:
        n = sum(len(c.layers) for c in self.chains)
        ch = ", ".join(f"{k} {v:.2g}" for k, v in self.output_change.items())
        return (f"{len(self.folded)} BatchNorms folded, {len(self.chains)} chains ({n} layers) equalized, "
                f"{len(self.relu6_replaced)} ReLU6 -> ReLU, mean channel range / tensor range "
                f"{self.mean_ratio('before'):.3f} -> {self.mean_ratio('after'):.3f}, high biases absorbed in "
                f"{sum(1 for a in self.absorbed if a.channels)} links; output change on the example: {ch}")


def _usable(links: list[Link], folded: set[str], relu6: str):
    """The links equalization may use, and (layer1, why) for the others."""
    keep, skipped = [], []
    for lk in links:
        why = None
        if lk.norm is not None and lk.norm not in folded:
            why = f"the BatchNorm '{lk.norm}' after it was not folded"
        elif lk.act == "relu6" and relu6 == "keep":
            why = f"ReLU6 before '{lk.layer2}' does not scale (relu6='relu' replaces it by ReLU)"
        elif lk.act == "relu6" and lk.act_module is None:
            why = f"the relu6 before '{lk.layer2}' (a function, or a module called elsewhere too) cannot be replaced"
        if why:
            skipped.append((lk.layer1, why))
        else:
            keep.append(lk)
    return keep, skipped


def _replace_relu6(model: nn.Module, links: list[Link]) -> list[str]:
    done = []
    for lk in links:
        if lk.act == "relu6":
            _set_module(model, lk.act_module, nn.ReLU(inplace=model.get_submodule(lk.act_module).inplace))
            done.append(lk.act_module)
    return done


def _ratios(layer: nn.Module) -> tuple[tuple[float, float], tuple[float, float]]:
    return range_ratios(out_ranges(layer)), range_ratios(in_ranges(layer))


def equalize(model: nn.Module, example_inputs, *, relu6: str = "relu", high_bias_absorption: bool = True,
             leaf_module: Iterable = (), max_iterations: int = 100, tolerance: float = 1e-4
             ) -> tuple[nn.Module, EqualizeReport]:
    """A copy of the float ``model`` with its BatchNorms folded, its layer chains equalized and high biases
    absorbed (see the module docstring); returns (model, :class:`EqualizeReport`). Call it before
    ``prepare_by_platform``.

    example_inputs        a tensor or a tuple of the model's inputs (random data is fine): shapes are checked on it
                          and the outputs compared before and after each step (``report.output_change``).
    relu6                 "relu" (replace the ReLU6 on equalized links by ReLU) or "keep" (leave links through a
                          ReLU6 alone); see the module docstring for why ReLU6 cannot be equalized exactly.
    high_bias_absorption  absorb layer 1's high biases through each ReLU into layer 2 (needs the folded BN's
                          statistics).
    leaf_module           module types or names the tracer does not enter (prepare_by_platform's ``leaf_module``).
    max_iterations, tolerance: sweeps over a chain's pairs until every scale is within ``tolerance`` of 1.
    """
    if relu6 not in RELU6_CHOICES:
        raise ValueError(f"equalize: relu6 must be one of {RELU6_CHOICES}, got {relu6!r} (\"relu\" replaces a "
                         "ReLU6 on an equalized link by ReLU, \"keep\" leaves such links alone)")
    model = copy.deepcopy(model)
    training = model.training
    model.eval()
    gm = trace(model, leaf_module)
    pairs, not_folded = foldable(gm, example_inputs)
    links, skipped = layer_links(gm)
    links, why = _usable(links, {bn for _, bn in pairs}, relu6)
    skipped = skipped + why
    del gm  # from here on the model's modules are replaced; the trace would hold the old ones

    changes = {}
    start = oc.outputs(model, example_inputs)
    replaced = _replace_relu6(model, links)
    ref = oc.outputs(model, example_inputs)
    if replaced:
        changes["relu6"] = oc.relative_change(start, ref)
    stats = fold_pairs(model, pairs)
    out = oc.outputs(model, example_inputs)
    changes["fold_bn"] = oc.relative_change(ref, out)
    oc.check_exact("BatchNorm folding", changes["fold_bn"])

    results, ranges, divided = [], {}, {}
    for chain in chains(links):
        names = [chain[0].layer1] + [lk.layer2 for lk in chain]
        layers = [model.get_submodule(n) for n in names]
        before = {n: _ratios(m) for n, m in zip(names, layers)}
        sweeps, converged, div = equalize_chain(layers, max_iterations, tolerance)
        for n, m, d in zip(names, layers, div):
            ranges[n] = LayerRanges(n, before[n][0], range_ratios(out_ranges(m)), before[n][1],
                                    range_ratios(in_ranges(m)))
            divided[n] = d
        scales = torch.cat(div[:-1])
        acts = tuple("relu6 -> relu" if lk.act == "relu6" else lk.act for lk in chain)
        results.append(ChainResult(tuple(names), acts, sweeps, converged,
                                   (float(scales.min()), float(scales.max()))))
        if not converged:
            logger.warning("equalization of %s did not settle in %d sweeps (the model is still exact; the ranges "
                           "are less equal than they could be)", " -> ".join(names), max_iterations)
    eq = oc.outputs(model, example_inputs)
    changes["cle"] = oc.relative_change(out, eq)
    oc.check_exact("cross-layer equalization", changes["cle"])

    absorbed = []
    if high_bias_absorption:
        for lk in links:
            if lk.act is None or lk.layer1 not in stats:
                continue  # through ReLU only (ReLU6s on links are ReLUs by now), with the BN's statistics
            st = stats[lk.layer1]
            d = divided.get(lk.layer1, torch.ones(1)).to(st.mean.device)
            c = absorption_amount(st.mean / d, st.std / d)
            l1, l2 = model.get_submodule(lk.layer1), model.get_submodule(lk.layer2)
            b_before = float(l1.bias.detach().abs().max())
            absorb(l1, l2, c)
            absorbed.append(AbsorbedBias(lk.layer1, lk.layer2, int((c > 0).sum()), float(c.max()), b_before,
                                         float(l1.bias.detach().abs().max())))
        changes["hba"] = oc.relative_change(eq, oc.outputs(model, example_inputs))
    model.train(training)
    if replaced:
        logger.info("equalize: ReLU6 replaced by ReLU (a ReLU6 does not scale; see tools.equalization) at %s",
                    ", ".join(replaced))
    report = EqualizeReport(tuple(pairs), tuple(not_folded), tuple(replaced), tuple(results),
                            tuple(ranges[n] for n in ranges), tuple(absorbed), tuple(skipped), changes)
    logger.info("equalize: %s", report.summary())
    return model, report
