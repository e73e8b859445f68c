"""``ptq_reconstruction``: fit a calibrated quantized model to its float self, unit by unit.

    report = ptq_reconstruction(model, calibration_batches, {"pattern": "block", "max_count": 20000, "prob": 0.5})

For each unit in execution order (``segments``): the unit's inputs are captured from the quantized model (units
before it already reconstructed) and its float inputs and outputs from the float model (the same model with every
quantizer off); the weights' rounding (AdaRound) and, with ``scale_lr`` > 0, the activation scales are then fitted
by Adam to

    loss = sum over outputs of mean over the batch of ||y_q - y_float||^2  +  weight * sum(1 - |2h - 1|^beta)

on random cached batches; with ``prob`` < 1 (QDrop) each activation element keeps its quantized value with
probability ``prob``, else takes the float one. At the end the rounding is hardened and written back into the
weights (``adaround.write_back``), so the model is again an ordinary prepared model: it exports with
``convert_export`` (the learned rounding becomes the integer weights), saves, and continues with QAT.
"""
from __future__ import annotations

import copy
import itertools
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import fx, nn

from ..fake_quantize import QuantizeBase
from ..utils.calibrate import _device, _to
from ..utils.state import disable_all, enable_quantization
from .adaround import AdaRoundFakeQuantize, beta_at, supports_adaround, write_back
from .config import ReconstructionConfig
from .segments import Capture, Segment, batch_args, split_segments

logger = logging.getLogger(__name__)

ROUNDING_LR = 1e-3  # Adam's learning rate for the rounding variables (AdaRound's and the ancestor's)

__all__ = ["ptq_reconstruction", "ReconstructionReport", "UnitResult"]


@dataclass
class UnitResult:
    name: str                    # block prefix or layer name
    layers: list[str]            # the quantized layers fitted in it
    loss_before: float           # output MSE against the float model (per element), round-to-nearest
    loss_after: float            # the same after reconstruction (hardened rounding); never above loss_before
    seconds: float
    rounding_changed: dict[str, float] = field(default_factory=dict)  # per layer: fraction rounded the other way
    reverted: bool = False       # the fit raised the MSE, so round-to-nearest and the old scales were kept


@dataclass
class ReconstructionReport:
    model: fx.GraphModule        # the reconstructed model (the one passed in, modified in place)
    config: ReconstructionConfig
    units: list[UnitResult]

    def table(self) -> str:
        rows = [f"{'unit':32s} {'layers':>6s} {'loss before':>12s} {'loss after':>12s} {'seconds':>8s}"]
        rows += [f"{u.name:32s} {len(u.layers):6d} {u.loss_before:12.4g} {u.loss_after:12.4g} {u.seconds:8.1f}"
                 for u in self.units]
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "units": [asdict(u) for u in self.units]}


def _tensors(value) -> list[torch.Tensor]:
    """The floating-point tensors in a (nested) value, in order."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _map(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_map(v, fn) for v in value)
    return value


def _mix(q, f, prob: float):
    """QDrop on the unit's inputs: each element keeps its quantized value with probability ``prob``."""
    if isinstance(q, torch.Tensor) and isinstance(f, torch.Tensor) and q.is_floating_point() and q.shape == f.shape:
        return torch.where(torch.rand_like(q) < prob, q, f)
    return q


def _rec_loss(out, target) -> torch.Tensor:
    """Sum over outputs of the per-sample squared error, averaged over the batch (the ancestor's scale, which
    ``weight`` is tuned for)."""
    total = 0.0
    for y, t in zip(_tensors(out), _tensors(target)):
        d = (y - t).float().pow(2)
        total = total + (d.reshape(d.shape[0], -1).sum(1).mean() if d.dim() else d)
    return total


@torch.no_grad()
def _mse(seg: Segment, inputs: list, targets: list, device) -> float:
    """Mean squared error per element over all cached batches and outputs."""
    err, count = 0.0, 0
    for inp, tgt in zip(inputs, targets):
        out = seg.module(*_to(inp, device))
        for y, t in zip(_tensors(out), _tensors(_to(tgt, device))):
            err += float((y - t).float().pow(2).sum())
            count += t.numel()
    return err / max(count, 1)


def _capture(model: fx.GraphModule, names: list[str], args: list[tuple], device, store) -> list[list]:
    cap = Capture(model, names)
    out = []
    with torch.no_grad():
        for a in args:
            values = cap.capture(*_to(a, device))
            out.append([_map(values[n], lambda t: t.detach().to(store)) for n in names])
    return out


def _check_calibrated(model: nn.Module, verb: str = "ptq_reconstruction") -> None:
    missing = [n for n, m in model.named_modules()
               if isinstance(m, QuantizeBase) and not m.is_weight and not m.non_float and not m.initialized]
    if missing:
        raise RuntimeError(f"{verb} needs a calibrated model; {len(missing)} activation quantizer(s) "
                           f"have no scale ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}). "
                           "Calibrate first: utils.calibrate.calibrate(model, batches)")


def _reconstruct(model, fp_model, seg: Segment, args, cfg: ReconstructionConfig, device) -> UnitResult:
    t0 = time.time()
    store = device if cfg.keep_gpu else torch.device("cpu")
    q_in = _capture(model, seg.inputs, args, device, store)
    fp_all = _capture(fp_model, seg.inputs + seg.outputs, args, device, store)
    fp_in = [v[:len(seg.inputs)] for v in fp_all]
    target = [v[len(seg.inputs):] for v in fp_all]
    before = _mse(seg, q_in, target, device)

    adarounds = {}
    if cfg.round_mode == "learned_hard_sigmoid":
        for name in seg.layers:
            layer = model.get_submodule(name)
            base = layer.weight_fake_quant
            if not supports_adaround(base):
                logger.warning("reconstruction: '%s' keeps round-to-nearest: its weight quantizer %s has a weight "
                               "transform or is off", name, type(base).__name__)
                continue
            ada = AdaRoundFakeQuantize(base, layer.quantized_weight_source()[0]).to(device)
            layer.weight_fake_quant = ada
            adarounds[name] = (layer, ada, base)
    scales = []
    if cfg.scale_lr > 0:
        found = {id(m): m for m in seg.module.modules()
                 if isinstance(m, QuantizeBase) and not m.is_weight and isinstance(getattr(m, "scale", None),
                                                                                   nn.Parameter)}
        scales = [m.scale for m in found.values()]
    saved = {name: layer.weight.detach().clone() for name, (layer, _, _) in adarounds.items()}
    saved_scales = [s.detach().clone() for s in scales]
    optimizers, schedulers = [], []
    if adarounds:
        optimizers.append(torch.optim.Adam([a.alpha for _, a, _ in adarounds.values()], lr=ROUNDING_LR))
    if scales:
        for s in scales:
            s.requires_grad_(True)
        a_opt = torch.optim.Adam(scales, lr=cfg.scale_lr)
        optimizers.append(a_opt)
        schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(a_opt, T_max=cfg.max_count, eta_min=0.0))

    try:
        if optimizers:
            _optimise(seg, q_in, fp_in, target, adarounds, scales, optimizers, schedulers, cfg, device)
    except BaseException:
        for layer, _, base in adarounds.values():  # leave the model as it was given
            layer.weight_fake_quant = base
        raise
    changed = {name: write_back(layer, ada, base) for name, (layer, ada, base) in adarounds.items()}
    after = _mse(seg, q_in, target, device)
    reverted = after > before
    if reverted:  # never worse than round-to-nearest on the calibration data
        with torch.no_grad():
            for name, (layer, _, _) in adarounds.items():
                layer.weight.copy_(saved[name])
            for s, v in zip(scales, saved_scales):
                s.copy_(v)
        changed = {name: 0.0 for name in changed}
        logger.info("reconstruction of %s raised its output MSE (%.4g -> %.4g): round-to-nearest kept", seg.name,
                    before, after)
        after = before
    return UnitResult(seg.name, list(seg.layers), before, after, time.time() - t0, changed, reverted)


def _optimise(seg: Segment, q_in, fp_in, target, adarounds, scales, optimizers, schedulers,
              cfg: ReconstructionConfig, device) -> None:
    seg.drop.active = cfg.prob < 1.0
    try:
        for step in range(cfg.max_count):
            j = int(torch.randint(len(q_in), ()))
            inp = _to(q_in[j], device)
            if cfg.prob < 1.0:
                inp = [_mix(q, f, cfg.prob) for q, f in zip(inp, _to(fp_in[j], device))]
            rec = _rec_loss(seg.module(*inp), _to(target[j], device))
            beta = beta_at(step, cfg.max_count, cfg.warm_up, cfg.b_range)
            loss = rec
            if beta is not None and adarounds:
                loss = rec + cfg.weight * sum(a.round_loss(beta) for _, a, _ in adarounds.values())
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            for sch in schedulers:
                sch.step()
            if step % max(1, cfg.max_count // 5) == 0 or step == cfg.max_count - 1:
                logger.debug("  %s step %d/%d: reconstruction %.4g, total %.4g", seg.name, step + 1,
                             cfg.max_count, float(rec.detach()), float(loss.detach()))
    finally:
        seg.drop.active = False
        for s in scales:
            s.requires_grad_(False)
            s.grad = None


def ptq_reconstruction(model: fx.GraphModule, calibration_batches: Iterable[Any],
                       config: ReconstructionConfig | dict | None = None,
                       float_model: fx.GraphModule | None = None) -> ReconstructionReport:
    """AdaRound / BRECQ / QDrop reconstruction of a prepared, calibrated model (modified in place; also returned in
    the report as ``report.model``).

    model                a GraphModule from ``prepare_by_platform``, calibrated (``utils.calibrate.calibrate``).
                         Its quantizers are switched to quantization (observers off) and it is left in its
                         previous train / eval mode.
    calibration_batches  batches as for ``calibrate``: tensors, (input, target) pairs or dicts of keyword
                         arguments; a few hundred to a thousand samples in all is usual. Each step uses one batch.
    config               a :class:`ReconstructionConfig` or a dict with its keys (the ancestor's names):
                         pattern, scale_lr, warm_up, weight, max_count, b_range, keep_gpu, round_mode, prob,
                         block_depth. Unknown keys are an error listing the valid ones.
    float_model          the float reference: the same prepared graph with every quantizer off. Default: a copy of
                         ``model`` with its quantizers off; after ``bias_correction`` (which moves the biases) pass
                         its ``report.float_model``, the model as it was before the correction.

    Returns a :class:`ReconstructionReport`: per unit its name, layers, output MSE against the float model before
    (round-to-nearest) and after, seconds, and the fraction of each layer's weights rounded the other way.
    """
    cfg = ReconstructionConfig.from_any(config)
    if not isinstance(model, fx.GraphModule) or not any(isinstance(m, QuantizeBase) for m in model.modules()):
        raise ValueError("ptq_reconstruction works on a model from prepare_by_platform (a GraphModule with fake "
                         "quantizers), calibrated; unwrap DistributedDataParallel first (model.module)")
    _check_calibrated(model)
    batches = list(calibration_batches)
    if not batches:
        raise ValueError("ptq_reconstruction: calibration_batches is empty; pass a list or DataLoader of "
                         "representative inputs")
    device = _device(model)
    was_training = model.training
    model.eval()
    enable_quantization(model)
    if float_model is None:
        fp_model = copy.deepcopy(model)
        disable_all(fp_model)
    else:
        fp_model = float_model.to(device).eval()
    args = [batch_args(model, b) for b in batches]
    segments = split_segments(model, cfg.pattern, cfg.block_depth, cfg.prob)
    logger.info("reconstruction (%s, round_mode %s, prob %g): %d units, %d iterations each, %d batches",
                cfg.pattern, cfg.round_mode, cfg.prob, len(segments), cfg.max_count, len(batches))
    grads = {p: p.requires_grad for p in itertools.chain(model.parameters(), fp_model.parameters())}
    for p in grads:
        p.requires_grad_(False)
    units = []
    try:
        for i, seg in enumerate(segments):
            res = _reconstruct(model, fp_model, seg, args, cfg, device)
            units.append(res)
            logger.info("reconstruction %d/%d %s (%d layers): output MSE %.4g -> %.4g, %.1f s", i + 1,
                        len(segments), seg.name, len(seg.layers), res.loss_before, res.loss_after, res.seconds)
    finally:
        for p, g in grads.items():
            p.requires_grad_(g)
        model.train(was_training)
    return ReconstructionReport(model, cfg, units)
