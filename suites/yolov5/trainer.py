"""The embedded default's float training from scratch (the suite's ``float_finetune``): YOLOv5 loss, the hyp
YAML's optimizer with linear warm-up and cosine decay per step, EMA of the weights, progress lines via
suites.common.meters. ``make_optimizer`` and ``schedule`` are also the QAT optimizer (the suite's
``make_training``; QAT's loop is the runner's)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from suites.common.meters import AverageMeter, ProgressMeter
from suites.common.training import cosine_schedule
from suites.common.training import make_optimizer as optimizer_factory

from .loss import YoloLoss


def ema_decay(updates: int, decay: float, tau: float) -> float:
    """The published EMA decay after ``updates`` updates: ``decay x (1 - exp(-updates / tau))``, small at first so
    the average forgets the initial weights quickly."""
    return decay * (1 - math.exp(-updates / tau))


class ModelEMA:
    """Exponential moving average of a model's weights on ``torch.optim.swa_utils.AveragedModel``, with the decay
    ramped up by :func:`ema_decay` (published: decay 0.9999, tau 2000; the suite passes its recipe's). Parameters
    and floating-point buffers (BatchNorm statistics) are averaged, so the statistics match the averaged weights;
    integer buffers are copied. ``ema`` is the averaged model, with the model's own state_dict keys."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0):
        self.decay, self.tau = decay, tau
        self.averaged = AveragedModel(model, multi_avg_fn=self._blend, use_buffers=True)
        self.ema.eval().requires_grad_(False)

    @property
    def ema(self) -> nn.Module:
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    def _blend(self, averaged, current, n_averaged) -> None:
        # AveragedModel copies the model on the first update and calls this from the second on
        d = ema_decay(int(n_averaged) + 1, self.decay, self.tau)
        for avg, cur in zip(averaged, current):
            if avg.is_floating_point():
                avg.lerp_(cur, 1 - d)
            else:
                avg.copy_(cur)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)


def make_optimizer(model: nn.Module, optim: str, lr: float, weight_decay: float, momentum: float):
    """YOLOv5's groups (weight decay on weights only), nesterov SGD or AdamW with beta1 = momentum."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return optimizer_factory(groups, optim, lr, momentum=momentum, nesterov=True, betas=(momentum, 0.999))


def schedule(optimizer, total: int, warmup: int, lrf: float = 0.01):
    """Linear warm-up, then cosine to ``lrf`` x lr0."""
    return cosine_schedule(optimizer, total, warmup, final=lrf)


def cycle(loader):
    while True:
        yield from loader


@dataclass
class StepPlan:
    """What :func:`train_steps` runs: ``steps`` optimizer steps at peak ``lr`` on ``img_size`` images, on ``device``,
    the progress lines labelled ``prefix`` every ``print_freq`` steps."""

    steps: int
    lr: float
    img_size: int
    device: object = "cpu"
    prefix: str = "Train"
    print_freq: int = 20


def train_steps(model, loader, hyp: dict, plan: StepPlan, ema: ModelEMA | None = None) -> dict:
    """Run ``plan.steps`` optimizer steps over ``loader`` (cycled), with the optimizer and schedule of ``hyp``."""
    steps, device = plan.steps, plan.device
    criterion = YoloLoss(model.detect.anchors, model.nc, hyp, plan.img_size)
    opt = make_optimizer(model, hyp.get("optimizer", "sgd"), plan.lr, hyp.get("weight_decay", 5e-4),
                         hyp.get("momentum", 0.937))
    sched = schedule(opt, steps, int(hyp.get("warmup_steps", 0)), hyp.get("lrf", 0.01))
    bt, lt, lbox, lobj, lcls = (AverageMeter("Time", ":6.3f"), AverageMeter("Loss", ":.4f"),
                                AverageMeter("box", ":.4f"), AverageMeter("obj", ":.4f"), AverageMeter("cls", ":.4f"))
    progress = ProgressMeter(steps, [bt, lt, lbox, lobj, lcls], prefix=f"{plan.prefix}: ", print_freq=plan.print_freq)
    model.train()
    end = time.time()
    for step, (x, t, _m, _i) in enumerate(cycle(loader)):
        if step >= steps:
            break
        x, t = x.to(device), t.to(device)
        raw = model(x)
        loss, items = criterion(raw, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(model)
        n = x.shape[0]
        lt.update(loss.item() / n, n)
        lbox.update(items[0].item(), n)
        lobj.update(items[1].item(), n)
        lcls.update(items[2].item(), n)
        bt.update(time.time() - end)
        end = time.time()
        progress.step(step)
    progress.close()
    return {"loss": round(lt.avg, 5), "steps": steps, "step_s": round(bt.avg, 4)}
