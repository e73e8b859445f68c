"""How much each quantized layer's loss suffers at each bit width.

    sens = layer_sensitivity(prepared_model, batches, candidates=(2, 4, 8), method="hessian")

method "hessian" (HAWQ-V2, Dong et al. 2020): the second-order estimate of the loss increase when the layer's
weights W are quantized at b bits,

    Omega(b) = 1/2 * Tr(H) / n * ||Q_b(W) - W||^2

with Tr(H) the trace of the loss Hessian with respect to W (n weights), estimated by Hutchinson's method:
E[v^T H v] over Rademacher vectors v, each H v one Hessian-vector product (autograd with create_graph, as
PyHessian computes it). An estimate that is not positive says nothing about the layer (noise of few vectors, above
all with one vector for all layers, or a non-convex point); counted as 0 it would make the layer "free" and the
allocation would give it the fewest bits (measured: the largest layers of mobilenet_v2 at 2 bits). Such a layer is
scored by the measured loss increase instead (method "loss"); ``Sensitivity.fallback`` names them.

method "loss": the loss measured with that one layer's weights quantized at b bits, the others float, minus the
float loss (clamped at 0).

Activation bits (``act_candidates``): the measured loss increase when the layer's input alone is quantized at b
bits (per tensor, min/max of the batch), for either method.

Q_b follows the layer's own weight scheme (per channel, symmetric, ...) at b bits, applied to the weight as it is
deployed (BatchNorm folded). The model is a ``prepare_by_platform`` model; it is not modified (a float copy is
used).
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..advanced_ptq.adaround import weight_fold_factor
from ..fake_quantize import QuantizeBase
from ..nn.qat import QATMixin
from ..observer.base import qparams_from_minmax
from ..scheme import QuantScheme
from ..utils.calibrate import _default_forward, _device, _to
from ..utils.state import disable_all

logger = logging.getLogger(__name__)

__all__ = ["Sensitivity", "layer_sensitivity", "hutchinson_trace", "quantize_weight", "quantized_layers"]

METHODS = ("hessian", "loss")
LossFn = Callable[[Any, Any, Any], torch.Tensor]  # (output, batch, float output) -> scalar


@dataclass
class Sensitivity:
    layers: list[str]                         # quantized layers, in model order
    candidates: tuple[int, ...]               # weight bit widths
    weight: dict[str, dict[int, float]]       # layer -> bits -> expected loss increase
    method: str
    act_candidates: tuple[int, ...] = ()
    activation: dict[str, dict[int, float]] = field(default_factory=dict)  # layer -> bits -> loss increase
    trace: dict[str, float] = field(default_factory=dict)  # "hessian": mean Hessian trace per weight
    fallback: list[str] = field(default_factory=list)  # "hessian": layers scored by the measured loss (trace <= 0)

    def ranking(self, bits: int | None = None) -> list[str]:
        """Layers, most sensitive first, at ``bits`` (default: the lowest candidate)."""
        b = min(self.candidates) if bits is None else bits
        return sorted(self.layers, key=lambda n: -self.weight[n][b])

    def scores(self, bits: int | None = None) -> dict[str, float]:
        b = min(self.candidates) if bits is None else bits
        return {n: self.weight[n][b] for n in self.layers}


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the layers with a weight quantizer (what ``module_qconfig`` keys name)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, QATMixin) and isinstance(getattr(m, "weight_fake_quant", None), QuantizeBase)]


def quantize_weight(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``w`` fake-quantized with min/max scales under ``scheme`` (per channel along scheme.ch_axis if so)."""
    if scheme.per_channel:
        dims = [d for d in range(w.dim()) if d != scheme.ch_axis]
        lo, hi = w.amin(dim=dims, keepdim=True), w.amax(dim=dims, keepdim=True)
    else:
        lo, hi = w.min(), w.max()
    scale, zp = qparams_from_minmax(lo, hi, scheme)
    q = torch.clamp(torch.round(w / scale) + zp, scheme.quant_min, scheme.quant_max)
    return (q - zp) * scale


def hutchinson_trace(loss: torch.Tensor, params: list[torch.Tensor], n_samples: int = 16,
                     generator: torch.Generator | None = None, blockwise: bool = True) -> list[float]:
    """Hutchinson estimates of the trace of d2 loss / d p2 for each tensor in ``params`` (the diagonal blocks of
    the Hessian), from ``n_samples`` Rademacher vectors v each: mean of v^T H v. ``loss`` must have been computed
    with autograd on.

    blockwise  True: v lives on one tensor at a time (one Hessian-vector product per tensor and sample; exactly
               the block's trace in expectation, with no noise from other blocks). False: one product per sample
               for all tensors together (PyHessian's estimator, cheaper; the cross-block terms average out but
               add variance, so a few samples can even give a negative estimate).
    """
    if n_samples < 1:
        raise ValueError(f"hutchinson_trace: n_samples must be at least 1, got {n_samples}")
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def rademacher(p):
        return torch.randint(0, 2, p.shape, generator=generator).to(p.device, p.dtype) * 2 - 1

    traces = [0.0] * len(params)
    for _ in range(n_samples):
        if blockwise:
            for i, (g, p) in enumerate(zip(grads, params)):
                v = rademacher(p)
                (hv,) = torch.autograd.grad(g, p, grad_outputs=v, retain_graph=True)
                traces[i] += float((v * hv).sum()) / n_samples
        else:
            vs = [rademacher(p) for p in params]
            hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
            for i, (v, hv) in enumerate(zip(vs, hvs)):
                traces[i] += float((v * hv).sum()) / n_samples
    return traces


@contextlib.contextmanager
def _twice_differentiable():
    """Hessian-vector products need every backward to be differentiable again (the fused CPU kernels are: with
    create_graph they run their backward in torch ops); a custom autograd.Function that is not gets a clear error."""
    try:
        yield
    except RuntimeError as exc:
        if "does not require grad" not in str(exc) and "grad_fn" not in str(exc):
            raise
        raise RuntimeError(f"Hessian-vector products failed ({exc}): an operation in the model has a backward that "
                           "autograd cannot differentiate twice (a custom autograd.Function). Use "
                           "method='loss', or make that operation twice differentiable") from exc


def default_loss(output, batch, float_output) -> torch.Tensor:
    """Cross-entropy against the batch's labels when it is (input, integer labels), else against the float
    model's own top-1 (pseudo-labels); logits must be (N, classes)."""
    out = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError("layer_sensitivity: the default loss needs (N, classes) logits; pass "
                         "loss_fn=lambda output, batch, float_output: ... for this model")
    labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
    if not (isinstance(labels, torch.Tensor) and not labels.is_floating_point() and labels.shape == out.shape[:1]):
        ref = float_output[0] if isinstance(float_output, (tuple, list)) else float_output
        labels = ref.argmax(1)
    return F.cross_entropy(out, labels)


class _InputQuant:
    """Forward pre-hook: the layer's input fake-quantized per tensor at ``bits`` (unsigned if it is >= 0)."""

    def __init__(self, bits: int):
        self.bits = bits

    def __call__(self, module, args):
        x = args[0]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():  # token ids: nothing to quantize
            return None
        signed = bool((x < 0).any())
        scheme = QuantScheme(bit=self.bits, symmetry=signed, signed=signed)
        return (quantize_weight(x, scheme),) + tuple(args[1:])


def layer_sensitivity(model: nn.Module, batches: Iterable[Any], candidates: Iterable[int] = (2, 4, 8),
                      method: str = "hessian", loss_fn: LossFn | None = None, n_samples: int = 16,
                      act_candidates: Iterable[int] = (), blockwise: bool = True,
                      forward: Callable[[nn.Module, Any], Any] | None = None) -> Sensitivity:
    """Per-layer sensitivity of a prepared model (see the module docstring).

    batches         a few batches: tensors, (input, labels) pairs or dicts of keyword arguments.
    candidates      weight bit widths (2..8).
    method          "hessian" (Hutchinson trace x quantization perturbation) or "loss" (measured).
    loss_fn         ``loss_fn(output, batch, float_output)`` -> scalar; default :func:`default_loss`.
    n_samples       Rademacher vectors per batch ("hessian").
    blockwise       "hessian": each layer's trace from vectors on that layer alone (default; see hutchinson_trace).
    act_candidates  activation bit widths to score too (measured loss increase); () for none.
    forward         ``forward(model, batch)`` for inputs ``calibrate``'s rule does not cover.
    """
    if method not in METHODS:
        raise ValueError(f"layer_sensitivity: method must be one of {METHODS}, got {method!r}")
    cands, acands = tuple(sorted(set(int(b) for b in candidates))), tuple(sorted(set(int(b) for b in act_candidates)))
    for b in cands + acands:
        if not 2 <= b <= 8:
            raise ValueError(f"layer_sensitivity: bit widths must be within 2..8, got {b}")
    if not cands:
        raise ValueError("layer_sensitivity: give at least one weight bit width in candidates")
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("layer_sensitivity needs a model from prepare_by_platform (it has no quantized layers)")
    batches = list(batches)
    if not batches:
        raise ValueError("layer_sensitivity: batches is empty")
    loss_fn, forward = loss_fn or default_loss, forward or _default_forward
    fm = copy.deepcopy(model).eval()
    disable_all(fm)
    device = _device(fm)
    batches = [_to(b, device) for b in batches]
    for p in fm.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        refs = [forward(fm, b) for b in batches]
        base = sum(float(loss_fn(r, b, r)) for r, b in zip(refs, batches)) / len(batches)

    def loss_now() -> float:
        with torch.no_grad():
            return sum(float(loss_fn(forward(fm, b), b, r)) for r, b in zip(refs, batches)) / len(batches)

    mods = {n: fm.get_submodule(n) for n in layers}
    delta = {}  # layer -> bits -> Q_b(W) - W, in the space of layer.weight
    for n, m in mods.items():
        w, factor = m.quantized_weight_source()[0].detach(), weight_fold_factor(m)
        scheme = m.weight_fake_quant.scheme
        safe = torch.where(factor == 0, torch.ones_like(factor), factor)
        delta[n] = {b: (quantize_weight(w, replace(scheme, bit=b)) - w) / safe for b in cands}

    result = Sensitivity(layers, cands, {}, method, acands)
    if method == "hessian":
        params = [mods[n].weight for n in layers]
        for p in params:
            p.requires_grad_(True)
        traces = [0.0] * len(params)
        gen = torch.Generator().manual_seed(0)
        with _twice_differentiable():
            for r, b in zip(refs, batches):
                est = hutchinson_trace(loss_fn(forward(fm, b), b, r), params, n_samples, gen, blockwise)
                traces = [t + e / len(batches) for t, e in zip(traces, est)]
        for p in params:
            p.requires_grad_(False)
        for n, p, tr in zip(layers, params, traces):
            result.trace[n] = tr / p.numel()
            if tr > 0:
                result.weight[n] = {b: 0.5 * tr / p.numel() * float(delta[n][b].pow(2).sum()) for b in cands}
            else:
                result.fallback.append(n)
        if result.fallback:
            logger.warning("sensitivity: the Hessian trace estimate of %d layer(s) is not positive (%s); they are "
                           "scored by the measured loss increase (more --mp-samples / blockwise estimates make this "
                           "rarer)", len(result.fallback), ", ".join(result.fallback[:6]))
    for n in layers if method == "loss" else result.fallback:
        w = mods[n].weight
        saved = w.detach().clone()
        result.weight[n] = {}
        for b in cands:
            with torch.no_grad():
                w.add_(delta[n][b])
            result.weight[n][b] = max(loss_now() - base, 0.0)
            with torch.no_grad():
                w.copy_(saved)
    for n in layers if acands else ():
        result.activation[n] = {}
        for b in acands:
            handle = mods[n].register_forward_pre_hook(_InputQuant(b))
            try:
                result.activation[n][b] = max(loss_now() - base, 0.0)
            finally:
                handle.remove()
    logger.info("sensitivity (%s) of %d layers at %s bits%s", method, len(layers), list(cands),
                f", activations at {list(acands)}" if acands else "")
    return result
