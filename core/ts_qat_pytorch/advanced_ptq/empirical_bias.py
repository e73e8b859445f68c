"""``bias_correction``: empirical bias correction (Nagel et al. 2019, section 4.2, the empirical variant) of a
prepared, calibrated model.

    calibrate(q, batches)
    q, report = bias_correction(q, batches)     # in place; before ptq_reconstruction or QAT
    print(report.table())

Quantization shifts the mean of a layer's output (E[W_q x_q] is not E[W x]), and the shift accumulates through the
network. For each quantized conv / linear layer, in execution order, the mean of its pre-activation output per output
channel is measured on the batches twice: in the quantized model (the layers before it already corrected) and in the
float model (the same model with every quantizer off, measured once, before any correction). The difference is
taken off the layer's bias:

* a layer with a folded BatchNorm (ConvBn2d, ConvBnReLU2d, LinearBn1d ...): off the BN's beta. The deployed bias is
  (b - running_mean) * s + beta, and in QAT's training mode beta is added after the normalisation too, so the
  correction holds in both;
* any other layer: off its bias (a zero bias is created where there was none).

These are the float parameters the forward and the export already put on the int32 grid
(``nn.qat.modules.deployed_bias``), so the corrected model exports, saves, reconstructs and trains like any prepared
model; what remains of a shift is that rounding (at most one step, input scale x weight scale). Afterwards the model's quantizers-off copy is no longer the float model (its biases carry the corrections):
``ptq_reconstruction(..., float_model=report.float_model)`` fits to the float model as it was.
"""
from __future__ import annotations

import collections
import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import fx, nn

from ..fake_quantize import QuantizeBase
from ..nn.qat import QATMixin
from ..utils.calibrate import _device, _to
from ..utils.state import disable_all, enable_quantization
from .reconstruction import _check_calibrated
from .segments import batch_args, split_segments

logger = logging.getLogger(__name__)

__all__ = ["bias_correction", "BiasCorrectionReport", "LayerShift"]


@dataclass(frozen=True)
class LayerShift:
    """One layer's mean output shift |E[y_quantized] - E[y_float]| per output channel: mean and max over channels,
    before any correction and after all of them, and where the correction went."""

    layer: str
    shift_before: float
    shift_before_max: float
    shift_after: float
    shift_after_max: float
    correction_max: float   # max |delta| taken off the bias
    target: str             # "bias", "new bias", "bn.bias" (beta) or "bn.running_mean" (a BN without affine)


@dataclass(frozen=True)
class BiasCorrectionReport:
    layers: tuple[LayerShift, ...]
    skipped: tuple[tuple[str, str], ...]        # (layer, why)
    batches: int
    seconds: float
    float_model: fx.GraphModule | None = field(default=None, repr=False, compare=False)  # the uncorrected float

    def to_dict(self) -> dict:
        return {"layers": [asdict(r) for r in self.layers], "skipped": [list(s) for s in self.skipped],
                "batches": self.batches, "seconds": round(self.seconds, 2)}

    def summary(self) -> str:
        def mean(key):
            return sum(getattr(r, key) for r in self.layers) / max(len(self.layers), 1)
        return (f"{len(self.layers)} layers corrected on {self.batches} batches in {self.seconds:.1f} s: mean "
                f"|output mean shift| {mean('shift_before'):.3g} -> {mean('shift_after'):.3g} (max over layers "
                f"{max((r.shift_before_max for r in self.layers), default=0.0):.3g} -> "
                f"{max((r.shift_after_max for r in self.layers), default=0.0):.3g})")

    def table(self) -> str:
        rows = [f"{'layer':40s} {'shift before':>12s} {'shift after':>12s} {'correction':>11s}  target"]
        rows += [f"{r.layer:40s} {r.shift_before:12.4g} {r.shift_after:12.4g} {r.correction_max:11.4g}  {r.target}"
                 for r in self.layers]
        return "\n".join(rows)


def _layers(model: fx.GraphModule) -> tuple[list[str], list[tuple[str, str]]]:
    """Quantized conv / linear layers in execution order; (layer, why) for those left out."""
    calls = collections.Counter(n.target for n in model.graph.nodes if n.op == "call_module")
    order, shared = [], {}
    for n in model.graph.nodes:
        if n.op != "call_module":
            continue
        mod = model.get_submodule(n.target)
        if not isinstance(mod, QATMixin) or isinstance(mod, nn.Embedding) or \
                not isinstance(getattr(mod, "weight_fake_quant", None), QuantizeBase):
            continue
        if calls[n.target] == 1:
            order.append(str(n.target))
        else:  # one bias for several uses: no single shift to correct
            shared[str(n.target)] = f"called {calls[n.target]} times"
    return order, list(shared.items())


def _channel_sum(layer: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum per output channel, accumulated in float64 over batches; values per channel): the last dimension for
    Linear, dimension 1 otherwise."""
    axis = y.dim() - 1 if isinstance(layer, nn.Linear) else 1
    dims = tuple(d for d in range(y.dim()) if d != axis)
    return y.detach().float().sum(dim=dims).double(), y.numel() // y.shape[axis]


class _MeanHooks:
    """While open: each named layer's pre-activation output summed per channel over whatever runs (the model, or a
    segment of it). A fused activation is taken out of its layer and applied by the hook instead, so the hook sees
    the output before it (the bias is added before the activation)."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.model, self.names = model, names
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.acts = {n: model.get_submodule(n).act for n in names
                     if getattr(model.get_submodule(n), "act", None) is not None}

    def _hook(self, name: str):
        def fn(mod, _inp, out):
            s, n = _channel_sum(mod, out)
            self.sums[name] = self.sums[name] + s if name in self.sums else s
            self.counts[name] = self.counts.get(name, 0) + n
            return self.acts[name](out) if name in self.acts else None
        return fn

    def __enter__(self) -> "_MeanHooks":
        self.handles = [self.model.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.names]
        for n in self.acts:
            self.model.get_submodule(n).act = None
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        for n, act in self.acts.items():
            self.model.get_submodule(n).act = act

    def means(self) -> dict[str, torch.Tensor]:
        return {n: (self.sums[n] / self.counts[n]).float() for n in self.sums}


@torch.no_grad()
def _means(model: nn.Module, names: list[str], args: list[tuple], device) -> dict[str, torch.Tensor]:
    """Per layer in ``names``: its pre-activation output's mean per channel over the batches (full passes)."""
    with _MeanHooks(model, names) as hooks:
        for a in args:
            model(*_to(a, device))
    return hooks.means()


@torch.no_grad()
def _correct_in_order(model: fx.GraphModule, names: list[str], args: list[tuple], float_means: dict, device
                      ) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Layer by layer in execution order: the layer's mean shift (the layers before it corrected) taken off its
    bias. The graph is run as one segment per layer (``segments``), each segment on the values the previous ones
    left for every batch, so the whole correction costs two passes over the batches, not one per layer."""
    wanted = set(names) & set(float_means)
    segments = split_segments(model, "layer")
    last_use = {n: k for k, seg in enumerate(segments) for n in seg.inputs}
    placeholders = [n.name for n in model.graph.nodes if n.op == "placeholder"]
    env = {p: [_to(a[i], device) for a in args] for i, p in enumerate(placeholders)}
    targets, deltas = {}, {}
    for k, seg in enumerate(segments):
        inputs = [[env[n][b] for n in seg.inputs] for b in range(len(args))]
        layer = seg.layers[0] if len(seg.layers) == 1 else None
        if layer in wanted:
            with _MeanHooks(model, [layer]) as hooks:
                for x in inputs:
                    seg.module(*x)
            delta = hooks.means()[layer] - float_means[layer]
            targets[layer], deltas[layer] = _correct(model.get_submodule(layer), delta), delta
            logger.debug("bias correction %s: max |shift| %.4g (%s)", layer, float(delta.abs().max()), targets[layer])
        outputs = [seg.module(*x) for x in inputs]
        for j, name in enumerate(seg.outputs):
            if last_use.get(name, -1) > k:
                env[name] = [o[j] for o in outputs]
        for name in seg.inputs:
            if last_use[name] == k:
                del env[name]
    return targets, deltas


@torch.no_grad()
def _correct(layer: nn.Module, delta: torch.Tensor) -> str:
    """Take ``delta`` (per output channel) off what the layer adds as its bias."""
    bn = getattr(layer, "bn", None)
    if bn is not None:
        if bn.affine:
            bn.bias.sub_(delta.to(bn.bias))
            return "bn.bias"
        bn.running_mean.add_((delta / layer._bn_scale()).to(bn.running_mean))
        return "bn.running_mean"
    if layer.bias is None:
        w = layer.weight
        layer.bias = nn.Parameter((-delta).to(w), requires_grad=w.requires_grad)
        return "new bias"
    layer.bias.sub_(delta.to(layer.bias))
    return "bias"


def _stats(d: torch.Tensor) -> tuple[float, float]:
    a = d.abs()
    return float(a.mean()), float(a.max())


def bias_correction(model: fx.GraphModule, batches: Iterable[Any]) -> tuple[fx.GraphModule, BiasCorrectionReport]:
    """Empirical bias correction of a prepared, calibrated model, in place (see the module docstring); returns
    (model, :class:`BiasCorrectionReport`).

    model    a GraphModule from ``prepare_by_platform``, calibrated (``utils.calibrate.calibrate``); it is switched to
             quantization (observers off) and left in its train / eval mode.
    batches  as for ``calibrate``: tensors, (input, target) pairs or dicts of keyword arguments; the calibration
             batches (a few hundred samples) are enough for per-channel means.

    Cost: about five forward passes over the batches (float, before, the correction's two, after); the values
    between layers are kept for all batches at once on the model's device, as many as the widest cut of the graph.
    """
    t0 = time.time()
    if not isinstance(model, fx.GraphModule) or not any(isinstance(m, QuantizeBase) for m in model.modules()):
        raise ValueError("bias_correction works on a model from prepare_by_platform (a GraphModule with fake "
                         "quantizers), calibrated; unwrap DistributedDataParallel first (model.module)")
    _check_calibrated(model, "bias_correction")
    batches = list(batches)
    if not batches:
        raise ValueError("bias_correction: batches is empty; pass the calibration batches (a list or DataLoader)")
    device = _device(model)
    training = model.training
    model.eval()
    enable_quantization(model)
    names, skipped = _layers(model)
    args = [batch_args(model, b) for b in batches]
    fp = copy.deepcopy(model)
    disable_all(fp)
    try:
        float_means = _means(fp, names, args, device)
        before = _means(model, names, args, device)
        skipped += [(n, "not reached by the batches") for n in names if n not in float_means]
        targets, deltas = _correct_in_order(model, names, args, float_means, device)
        after = _means(model, list(targets), args, device)
    finally:
        model.train(training)
    rows = []
    for name, target in targets.items():
        b, bm = _stats(before[name] - float_means[name])
        a, am = _stats(after[name] - float_means[name])
        rows.append(LayerShift(name, b, bm, a, am, float(deltas[name].abs().max()), target))
    report = BiasCorrectionReport(tuple(rows), tuple(skipped), len(batches), time.time() - t0, fp)
    logger.info("bias correction: %s", report.summary())
    return model, report
