"""``smooth_quant``: SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", ICML 2023) on the FLOAT model, before prepare_by_platform.

    model, report = smooth_quant(model, calibration_batches, alpha=0.5)
    q = prepare_by_platform(model, backend)               # then calibrate as usual

It runs on the float model because it changes float weights (and needs float activation statistics), not
quantizers; it is a post-training step all the same, run once before calibration.

A LayerNorm's output channels differ wildly in range in transformer encoders (a few hidden dimensions carry
outliers), so one per-tensor grid for the Linear layers' input spends its levels on a few channels. For the Linear
layers reading a LayerNorm, with per input channel j

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

(max|X_j| over the calibration batches, max|W_j| over the column j of every Linear reading that LayerNorm),
the LayerNorm's weight and bias are divided by s and the Linears' input columns multiplied by s: X W^T is unchanged,
X's channels are flatter, W's a little less so. ``alpha`` moves the difficulty between activations (0) and weights
(1); 0.5 is the paper's default for most models.

Readers of the LayerNorm other than those Linears (``shared_norms``). In a pre-LayerNorm transformer the LayerNorm
feeds only the Q/K/V or FFN-in Linears: folding into it changes nothing else, and nothing extra is exported. In a
post-LayerNorm encoder (BERT, MiniLM, DistilBERT, RoBERTa) the LayerNorm's output is also the residual stream: the
residual sum must keep the unsmoothed values, and no weight can restore them (the next LayerNorm is not invariant to
per-channel scales). With ``shared_norms="compensate"`` (default) those readers read ``ChannelScale(s)`` of the
output (``ts_qat_pytorch.nn.ChannelScale``, a float multiply: exact, one float Mul per such LayerNorm in the export,
on the float residual path; the Linears' integer path has nothing extra), and the model returned is a
``torch.fx.GraphModule`` with the same module names. With ``"skip"`` such LayerNorms are left alone (reported).

The float outputs are unchanged up to float error (checked on the first batch: ``report.output_change``). The input
model is not modified.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn

from ..nn.channel_scale import ChannelScale
from ..utils.calibrate import _default_forward, _device, _to
from . import output_check as oc
from .patterns import NormGroup, norm_linear_groups, trace

logger = logging.getLogger(__name__)

__all__ = ["smooth_quant", "smoothing_groups", "SmoothQuantReport", "SmoothedNorm", "SHARED_NORM_CHOICES"]

SHARED_NORM_CHOICES = ("compensate", "skip")
MIN_SCALE = 1e-5  # the paper's clamp of s


@dataclass(frozen=True)
class SmoothedNorm:
    """One LayerNorm and its Linears. Pairs are (before, after). ``act_max``: max |X| of the Linears' input (the
    per-tensor range their input quantizer covers); ``act_spread``: that range over the channels' mean range (1 =
    flat); ``weight_max``: max |W| over the Linears; ``restored_for``: the other readers given ChannelScale(s)."""

    norm: str
    linears: tuple[str, ...]
    restored_for: tuple[str, ...]
    act_max: tuple[float, float]
    act_spread: tuple[float, float]
    weight_max: tuple[float, float]
    scale_range: tuple[float, float]


@dataclass(frozen=True)
class SmoothQuantReport:
    alpha: float
    norms: tuple[SmoothedNorm, ...]
    skipped: tuple[tuple[str, str], ...]   # (LayerNorm, why)
    batches: int
    output_change: float                   # relative, on the first batch

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        def mean(key, i):
            vals = [getattr(n, key)[i] for n in self.norms]
            return sum(vals) / max(len(vals), 1)
        restored = sum(1 for n in self.norms if n.restored_for)
        linears = sum(len(n.linears) for n in self.norms)
        return (f"alpha {self.alpha:g}: {len(self.norms)} LayerNorms smoothed ({linears} Linears, {restored} with a "
                f"ChannelScale restoring their residual readers), {len(self.skipped)} "
                f"left; Linear input max|X| (mean over LayerNorms) {mean('act_max', 0):.3g} -> "
                f"{mean('act_max', 1):.3g}, max / mean channel range {mean('act_spread', 0):.3g} -> "
                f"{mean('act_spread', 1):.3g}, weight max|W| {mean('weight_max', 0):.3g} -> "
                f"{mean('weight_max', 1):.3g}; output change {self.output_change:.2g}")


def smoothing_groups(model: nn.Module, leaf_module: Iterable = (), shared_norms: str = "compensate"
                     ) -> tuple[list[NormGroup], list[tuple[str, str]]]:
    """The LayerNorm -> Linear groups ``smooth_quant`` would smooth, and (LayerNorm, why not) for the others. No
    data, one trace: a cheap check before long work."""
    if shared_norms not in SHARED_NORM_CHOICES:
        raise ValueError(f"shared_norms must be one of {SHARED_NORM_CHOICES}, got {shared_norms!r}")
    return _groups(trace(model, leaf_module), shared_norms)


def _groups(gm: fx.GraphModule, shared_norms: str) -> tuple[list[NormGroup], list[tuple[str, str]]]:
    groups, skipped = norm_linear_groups(gm)
    if shared_norms == "skip":
        skipped += [(g.norm, f"its output is also read by {', '.join(g.others)} (shared_norms='compensate' restores "
                             "it for them with a ChannelScale)") for g in groups if g.others]
        groups = [g for g in groups if not g.others]
    return groups, skipped


def _channel_max(model: nn.Module, groups: list[NormGroup], batches: list, forward) -> dict[str, torch.Tensor]:
    """max |output| per channel of each group's LayerNorm over the batches."""
    found: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_mod, _inp, out):
            m = out.detach().abs().reshape(-1, out.shape[-1]).amax(0).float()
            found[name] = m if name not in found else torch.maximum(found[name], m)
        return fn

    handles = [model.get_submodule(g.norm).register_forward_hook(hook(g.norm)) for g in groups]
    device = _device(model)
    try:
        with torch.no_grad():
            for b in batches:
                forward(model, _to(b, device))
    finally:
        for h in handles:
            h.remove()
    return found


@torch.no_grad()
def _smooth(model: nn.Module, g: NormGroup, x_max: torch.Tensor, alpha: float) -> tuple[torch.Tensor, SmoothedNorm]:
    ln = model.get_submodule(g.norm)
    linears = [model.get_submodule(n) for n in g.linears]
    w_max = torch.stack([lin.weight.detach().abs().amax(0).float() for lin in linears]).amax(0)
    x_max = x_max.to(w_max)
    ok = (x_max > 0) & (w_max > 0)
    s = x_max.clamp(min=MIN_SCALE).pow(alpha) / w_max.clamp(min=MIN_SCALE).pow(1 - alpha)
    s = torch.where(ok, s, torch.ones_like(s)).clamp(min=MIN_SCALE)
    ln.weight.div_(s.to(ln.weight))
    if ln.bias is not None:
        ln.bias.div_(s.to(ln.bias))
    w_before = float(w_max.max())
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight).reshape(1, -1))
    w_after = max(float(lin.weight.detach().abs().max()) for lin in linears)
    after = x_max / s

    def spread(m):
        return float(m.max()) / max(float(m.mean()), 1e-12)
    return s, SmoothedNorm(g.norm, g.linears, (), (float(x_max.max()), float(after.max())),
                           (spread(x_max), spread(after)), (w_before, w_after), (float(s.min()), float(s.max())))


def _restore_readers(gm: fx.GraphModule, g: NormGroup, s: torch.Tensor) -> None:
    """The LayerNorm's readers other than its Linears read ChannelScale(s) of it: the unsmoothed values."""
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == g.norm)
    name = f"{g.norm}_unsmoothed"
    gm.add_submodule(name, ChannelScale(s))
    with gm.graph.inserting_after(node):
        restored = gm.graph.call_module(name, (node,))
    for user in [u for u in node.users if u.name in g.others]:
        user.replace_input_with(node, restored)


def smooth_quant(model: nn.Module, batches: Iterable[Any], alpha: float = 0.5, *,
                 forward: Callable[[nn.Module, Any], Any] | None = None, leaf_module: Iterable = (),
                 shared_norms: str = "compensate") -> tuple[nn.Module, SmoothQuantReport]:
    """SmoothQuant of the float ``model``'s LayerNorm -> Linear groups (see the module docstring); returns (the
    smoothed copy, :class:`SmoothQuantReport`). Call it before ``prepare_by_platform``.

    batches       calibration batches as for ``utils.calibrate.calibrate`` (a tensor, (input, target), a dict of
                  keyword arguments), moved to the model's device; a few hundred samples are plenty.
    alpha         migration strength in (0, 1): 0.5 is the paper's default, larger moves more range into weights.
    forward       ``forward(model, batch)`` for batches the default cannot feed (several inputs).
    leaf_module   module types or names the tracer does not enter (prepare_by_platform's ``leaf_module``).
    shared_norms  "compensate" (a LayerNorm also read by a residual sum is smoothed, the other readers restored by
                  a ChannelScale: the result is a GraphModule) or "skip" (such LayerNorms are left alone).
    """
    if shared_norms not in SHARED_NORM_CHOICES:
        raise ValueError(f"smooth_quant: shared_norms must be one of {SHARED_NORM_CHOICES}, got {shared_norms!r}")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"smooth_quant: alpha must be in (0, 1), got {alpha} (0.5 is the paper's default)")
    batches = list(batches)
    if not batches:
        raise ValueError("smooth_quant: batches is empty; pass a list or DataLoader of representative inputs "
                         "(the activation ranges are measured on them)")
    forward = forward or _default_forward
    model = copy.deepcopy(model)
    training = model.training
    model.eval()
    gm = trace(model, leaf_module)
    groups, skipped = _groups(gm, shared_norms)
    if not groups:
        raise ValueError(f"smooth_quant: {type(model).__name__} has no LayerNorm read by a Linear layer that can be "
                         f"smoothed{' (' + '; '.join(f'{n}: {w}' for n, w in skipped) + ')' if skipped else ''}; "
                         "SmoothQuant is for transformer blocks (LayerNorm -> Q/K/V or FFN-in Linear)")
    device = _device(model)
    with torch.no_grad():
        before = oc.flat(forward(model, _to(batches[0], device)))
    x_max = _channel_max(model, groups, batches, forward)
    done = []
    result: nn.Module = model
    for g in groups:
        if g.norm not in x_max:
            skipped.append((g.norm, "not reached by the batches"))
            continue
        s, rec = _smooth(model, g, x_max[g.norm], float(alpha))
        if g.others:
            _restore_readers(gm, g, s)
            result = gm
            rec = dataclasses.replace(rec, restored_for=g.others)
        done.append(rec)
    if result is gm:
        gm.recompile()
    with torch.no_grad():
        change = oc.relative_change(before, oc.flat(forward(result, _to(batches[0], device))))
    oc.check_exact("SmoothQuant", change)
    result.train(training)
    report = SmoothQuantReport(float(alpha), tuple(done), tuple(skipped), len(batches), change)
    logger.info("smooth_quant: %s", report.summary())
    return result, report
