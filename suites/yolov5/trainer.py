"""Training loop shared by float training and QAT: YOLOv5 loss, SGD or AdamW with linear warm-up and cosine
decay per step, optional EMA of the weights (float only), optional distillation from a float teacher on the
raw feature maps (QAT), progress lines via suites.common.meters."""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn as nn

from suites.common.meters import AverageMeter, ProgressMeter
from suites.common.training import cosine_schedule
from suites.common.training import make_optimizer as optimizer_factory

from .loss import YoloLoss


class ModelEMA:
    """Exponential moving average of the weights, decay ramped up over the first ``tau`` updates."""

    def __init__(self, model: nn.Module, decay: float = 0.999, tau: float = 200.0):
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        msd = model.state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])


def make_optimizer(model: nn.Module, hyp: dict, lr: float):
    """YOLOv5's groups (weight decay on weights only), nesterov SGD or AdamW with beta1 = momentum."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": hyp.get("weight_decay", 5e-4)},
              {"params": no_decay, "weight_decay": 0.0}]
    momentum = hyp.get("momentum", 0.937)
    return optimizer_factory(groups, hyp.get("optimizer", "sgd"), lr, momentum=momentum, nesterov=True,
                             betas=(momentum, 0.999))


def schedule(optimizer, total: int, warmup: int, lrf: float = 0.01):
    """Linear warm-up, then cosine to ``lrf`` x lr0."""
    return cosine_schedule(optimizer, total, warmup, final=lrf)


def cycle(loader, sampler=None):
    epoch = 0
    while True:
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_steps(model, loader, steps: int, hyp: dict, lr: float, anchors, nc: int, img_size: int, log,
                prefix: str = "Train", ema: ModelEMA | None = None, teacher=None, sampler=None, device="cpu",
                print_freq: int = 20, on_step=None) -> dict:
    """Run ``steps`` optimizer steps over ``loader`` (cycled). ``model`` may be DDP-wrapped."""
    criterion = YoloLoss(anchors, nc, hyp, img_size)
    opt = make_optimizer(model, hyp, lr)
    sched = schedule(opt, steps, int(hyp.get("warmup_steps", 0)), hyp.get("lrf", 0.01))
    bt, lt, lbox, lobj, lcls = (AverageMeter("Time", ":6.3f"), AverageMeter("Loss", ":.4f"),
                                AverageMeter("box", ":.4f"), AverageMeter("obj", ":.4f"), AverageMeter("cls", ":.4f"))
    import torch.distributed as dist
    progress = ProgressMeter(steps, [bt, lt, lbox, lobj, lcls], prefix=f"{prefix}: ", print_freq=print_freq,
                             enabled=not dist.is_initialized() or dist.get_rank() == 0)  # rank 0 logs
    kd = float(hyp.get("distill", 0.0)) if teacher is not None else 0.0
    model.train()
    end = time.time()
    for step, (x, t, _m, _i) in enumerate(cycle(loader, sampler)):
        if step >= steps:
            break
        x, t = x.to(device), t.to(device)
        raw = model(x)
        loss, items = criterion(raw, t)
        if kd:
            with torch.no_grad():
                traw = teacher(x)
            loss = loss + kd * sum(nn.functional.mse_loss(a, b) for a, b in zip(raw, traw)) * x.shape[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(getattr(model, "module", model))
        n = x.shape[0]
        lt.update(loss.item() / n, n)
        lbox.update(items[0].item(), n)
        lobj.update(items[1].item(), n)
        lcls.update(items[2].item(), n)
        bt.update(time.time() - end)
        end = time.time()
        progress.step(step)
        if on_step is not None:
            on_step(step)
    progress.close()
    return {"loss": round(lt.avg, 5), "steps": steps, "step_s": round(bt.avg, 4)}
