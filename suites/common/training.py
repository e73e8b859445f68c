"""The runner's training pieces (pytorch/examples style): seeds and RNG state for exact resume, the epoch subset
sampler, loaders, the kd loss, optimizer and LR schedule factories, and one training epoch.

    train_epoch(run, loader, model, Training(optimizer, scheduler, teacher), epoch)  -> (scores, loss)

A training batch ``(inputs, target, ...)`` goes through :func:`batch_inputs` -> ``model(*inputs)``; the loss and the
progress line's values are ``suite.loss(output, target, teacher_output, cfg)`` (the teacher's output with
distillation); the progress line shows Time, Data, Loss and the suite's ``train_meters``.
"""
from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from typing import Any
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

from suites.common.distributed import is_main
from suites.common.meters import AverageMeter, ProgressMeter

logger = logging.getLogger("suites")


# ---- seeds and RNG state
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
          "numpy_pos": int(np.random.get_state()[2]), "python": repr(random.getstate())}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    if not st:
        return
    torch.set_rng_state(st["torch"])
    keys = np.asarray(torch.as_tensor(st["numpy"]).numpy(), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, int(st["numpy_pos"]), 0, 0.0))
    random.setstate(ast.literal_eval(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---- data
class EpochSubsetSampler(torch.utils.data.Sampler):
    """A shuffled subset of ``num`` indices, different for each epoch and reproducible from (seed, epoch);
    split between the processes of a distributed run."""

    def __init__(self, n_total: int, num: int | None, seed: int, rank: int = 0, world: int = 1):
        self.n_total, self.num = n_total, min(num or n_total, n_total)
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch = 0
        self.per_rank = self.num // world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        perm = torch.randperm(self.n_total, generator=g)[: self.per_rank * self.world]
        return iter(perm[self.rank::self.world].tolist())

    def __len__(self) -> int:
        return self.per_rank


def loader(ds, batch_size, workers, sampler=None, shuffle=False, collate_fn=None):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                                       sampler=sampler, num_workers=workers, pin_memory=torch.cuda.is_available(),
                                       persistent_workers=False, collate_fn=collate_fn)


def skipped_images(ds) -> int | None:
    """Unreadable samples skipped so far by ``ds`` (through Subset wrappers): a data set that skips bad files keeps
    the count in a ``skipped`` multiprocessing.Value (shared with DataLoader workers); None for the others."""
    while isinstance(ds, torch.utils.data.Subset):
        ds = ds.dataset
    counter = getattr(ds, "skipped", None)
    return None if counter is None else int(counter.value)


def report_skips(dataset, before: int | None, what: str) -> None:
    """Log the unreadable images skipped (--on-bad-image skip) since ``before``, counted in every worker."""
    now = skipped_images(dataset)
    if before is not None and now is not None and now > before:
        logger.warning("%s: skipped %d unreadable image(s) (--on-bad-image skip: the next readable image took each "
                       "one's place; the files are named above); %d skipped so far in this data set", what,
                       now - before, now)


# ---- loss, optimizer, schedule
def kd_loss(student_logits, teacher_logits, target, alpha: float, temperature: float):
    """``alpha * KL(softmax(t/T) || softmax(s/T)) * T^2 + (1 - alpha) * CE``."""
    t = temperature
    kd = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                  reduction="batchmean") * (t * t)
    ce = F.cross_entropy(student_logits, target)
    return alpha * kd + (1.0 - alpha) * ce


def make_optimizer(params, optim: str, lr: float, momentum: float = 0.9, wd: float = 0.0, nesterov: bool = False,
                   betas: tuple[float, float] = (0.9, 0.999)):
    """``sgd`` (with momentum) or ``adam`` / ``adamw`` (both AdamW); parameters without gradients are left out;
    ``params`` may be parameter groups (their own settings win over ``wd``)."""
    params = [p for p in params if p.requires_grad] if not _is_groups(params) else params
    if optim.lower() in ("adam", "adamw"):
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov)


def qat_param_groups(model, lr: float, qparam_lr: float | None):
    """Weights at ``lr``; the quantizers' learned scales / zero points at ``qparam_lr`` (None: ``lr``, one group).
    Adam moves a parameter by about its learning rate per step, whatever its size: the rate that suits weights can
    be far too fast for a 4-bit weight scale of 0.01, or too slow for an activation scale (--qparam-lr)."""
    if not qparam_lr or qparam_lr == lr:
        return model.parameters()
    from ts_qat_pytorch.fake_quantize import QuantizeBase
    qparams = {id(p) for m in model.modules() if isinstance(m, QuantizeBase) for p in m.parameters(recurse=False)}
    rest = [p for p in model.parameters() if id(p) not in qparams and p.requires_grad]
    quant = [p for p in model.parameters() if id(p) in qparams and p.requires_grad]
    return [{"params": rest, "lr": lr}, {"params": quant, "lr": qparam_lr, "weight_decay": 0.0}]


def _is_groups(params) -> bool:
    return isinstance(params, list) and bool(params) and isinstance(params[0], dict)


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int = 0, final: float = 0.0):
    """Per-step schedule: linear warm-up, then cosine from the base LR to ``final`` x the base LR."""
    total_steps = max(1, total_steps)

    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        prog = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * prog))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def batch_inputs(batch, device, memory_format=torch.contiguous_format) -> tuple[tuple, Any]:
    """(the model's inputs as a tuple, the target) of one batch ``(inputs or a tuple of inputs, target, ...)``, on
    ``device``; image batches in ``memory_format``."""
    x, target = batch[0], batch[1]
    xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    xs = tuple(t.to(device, non_blocking=True, memory_format=memory_format) if t.dim() == 4
               else t.to(device, non_blocking=True) for t in xs)
    return xs, target.to(device, non_blocking=True) if isinstance(target, torch.Tensor) else target


def on_device(x, device) -> tuple:
    """An example input (a tensor or a tuple) as a tuple on ``device``."""
    x = x if isinstance(x, tuple) else (x,)
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in x)


def autocast(run):
    if not run.config.amp:
        return torch.autocast("cpu", enabled=False)
    if run.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", dtype=torch.bfloat16)


def input_format(model) -> torch.memory_format:
    """channels_last when the model's convolution weights are (the float stages use it on the CPU: depthwise and
    1x1 convolutions run ~1.5x faster in that layout); the batch is converted to match."""
    for p in model.parameters():
        if p.dim() == 4:
            cl = p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            return torch.channels_last if cl else torch.contiguous_format
    return torch.contiguous_format


@dataclass
class Training:
    """How an epoch trains: the optimizer and the per-step LR schedule, the distillation teacher, the AMP scaler;
    for the QAT epochs also their loader and sampler, and whether each epoch is recorded (evaluated, saved)."""

    optimizer: Any
    scheduler: Any = None
    teacher: Any = None
    scaler: Any = None
    loader: Any = None
    sampler: Any = None
    record: bool = True
    prefix: str = "Epoch"


def train_epoch(run, loader, model, training: Training, epoch: int):
    """One epoch; returns ({meter label: average}, average loss)."""
    suite, cfg = run.suite, run.config
    batch_time = AverageMeter("Time", ":6.3f")
    data_time = AverageMeter("Data", ":6.3f")
    losses = AverageMeter("Loss", ":.4e")
    scores = [AverageMeter(label, fmt) for label, fmt in suite.train_meters]
    progress = ProgressMeter(len(loader), [batch_time, data_time, losses, *scores],
                             prefix=f"{training.prefix}: [{epoch}]", print_freq=cfg.print_freq, enabled=is_main())
    model.train()
    fmt = input_format(model)
    skipped_before = skipped_images(loader.dataset)
    optimizer, scaler, teacher = training.optimizer, training.scaler, training.teacher
    end = time.time()
    try:
        for i, batch in enumerate(loader):
            data_time.update(time.time() - end)
            inputs, target = batch_inputs(batch, run.device, fmt)
            with autocast(run):
                output = model(*inputs)
                t_out = None
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(*inputs)
                loss, values = suite.loss(output, target, t_out, cfg)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} step {i}; lower --lr")
            n = inputs[0].size(0)
            losses.update(loss.item(), n)
            for meter, value in zip(scores, values):
                meter.update(value, n)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if cfg.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
                optimizer.step()
            if training.scheduler is not None:
                training.scheduler.step()
            batch_time.update(time.time() - end)
            end = time.time()
            progress.step(i)
    finally:
        progress.close()
    report_skips(loader.dataset, skipped_before, f"{training.prefix}: [{epoch}]")
    return {m.name: m.avg for m in scores}, losses.avg
