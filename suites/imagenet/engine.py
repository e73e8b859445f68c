"""Training and evaluation loops of the ImageNet suite (pytorch/examples style): data loaders, kd loss, train,
validate (PyTorch and onnxruntime), optimizer and schedule, RNG state for exact resume."""
from __future__ import annotations

import logging
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

from suites.common.meters import AverageMeter, ProgressMeter, Summary, accuracy
from suites.imagenet.cli import SuiteError, is_main

logger = logging.getLogger("imagenet")


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
    import ast
    if not st:
        return
    torch.set_rng_state(st["torch"])
    keys = np.asarray(torch.as_tensor(st["numpy"]).numpy(), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, int(st["numpy_pos"]), 0, 0.0))
    random.setstate(ast.literal_eval(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def make_datasets(args):
    """(train, val, calib) datasets; train may be subset per epoch by the sampler."""
    if args.embedded:
        from suites.imagenet.data import FashionMNISTImageNet, load_fashion_mnist
        fm = load_fashion_mnist()
        (xtr, ytr), (xte, yte) = fm["train"], fm["test"]
        train = FashionMNISTImageNet(xtr, ytr, args.image_size, train=True)
        calib = FashionMNISTImageNet(xtr, ytr, args.image_size, train=False)
        val = FashionMNISTImageNet(xte, yte, args.image_size, train=False)
    else:
        import os

        from suites.imagenet.data import check_imagefolder, class_folders, imagefolder_datasets
        check_imagefolder(args.data)
        n = len(class_folders(os.path.join(args.data, "train")))  # before ImageFolder scans every image
        if n != args.num_classes:
            more = (f"the model's {args.num_classes - n} extra outputs would never see a label" if n < args.num_classes
                    else "the labels would not fit the model's outputs")
            raise SuiteError(f"--data '{args.data}' has {n} classes (class folders in train/) but -nc/--num-classes "
                             f"is {args.num_classes}: {more}; use -nc {n}")
        train, val, calib = imagefolder_datasets(args.data, args.image_size, getattr(args, "on_bad_image", "error"))
    if args.val_images:
        val = torch.utils.data.Subset(val, range(min(args.val_images, len(val))))
    return train, val, calib


def report_skips(loader, before: int | None, what: str) -> None:
    """Log the unreadable images skipped (--on-bad-image skip) while ``loader`` ran, counted in every worker."""
    from suites.imagenet.data import skipped_images
    now = skipped_images(loader.dataset)
    if before is not None and now is not None and now > before:
        logger.warning("%s: skipped %d unreadable image(s) (--on-bad-image skip: the next readable image took each "
                       "one's place; the files are named above); %d skipped so far in this data set", what,
                       now - before, now)


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


def loader(ds, batch_size, workers, sampler=None, shuffle=False):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                                       sampler=sampler, num_workers=workers, pin_memory=torch.cuda.is_available(),
                                       persistent_workers=False)


def kd_loss(student_logits, teacher_logits, target, alpha: float, temperature: float):
    t = temperature
    kd = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                  reduction="batchmean") * (t * t)
    ce = F.cross_entropy(student_logits, target)
    return alpha * kd + (1.0 - alpha) * ce


def autocast(args):
    if not args.amp:
        return torch.autocast("cpu", enabled=False)
    if args.device.type == "cuda":
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


def train(train_loader, model, criterion, optimizer, scheduler, epoch, device, args, teacher=None, scaler=None,
          prefix="Epoch"):
    batch_time = AverageMeter("Time", ":6.3f")
    data_time = AverageMeter("Data", ":6.3f")
    losses = AverageMeter("Loss", ":.4e")
    top1 = AverageMeter("Acc@1", ":6.2f")
    top5 = AverageMeter("Acc@5", ":6.2f")
    progress = ProgressMeter(len(train_loader), [batch_time, data_time, losses, top1, top5],
                             prefix=f"{prefix}: [{epoch}]", print_freq=args.print_freq, enabled=is_main(args))
    model.train()
    fmt = input_format(model)
    from suites.imagenet.data import skipped_images
    skipped_before = skipped_images(train_loader.dataset)
    end = time.time()
    try:
        for i, (images, target) in enumerate(train_loader):
            data_time.update(time.time() - end)
            images = images.to(device, non_blocking=True, memory_format=fmt)
            target = target.to(device, non_blocking=True)
            with autocast(args):
                output = model(images)
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(images)
                    loss = kd_loss(output.float(), t_out.float(), target, args.distill_alpha, args.temperature)
                else:
                    loss = criterion(output.float(), target)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} step {i}; lower --lr")
            acc1, acc5 = accuracy(output.float(), target, topk=(1, 5))
            losses.update(loss.item(), images.size(0))
            top1.update(acc1[0], images.size(0))
            top5.update(acc5[0], images.size(0))
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            batch_time.update(time.time() - end)
            end = time.time()
            progress.step(i)
    finally:
        progress.close()
    report_skips(train_loader, skipped_before, f"{prefix}: [{epoch}]")
    return top1.avg, losses.avg


@torch.no_grad()
def _score(val_loader, predict, args, prefix: str, criterion=None, device=None):
    """Top-1/top-5 (and loss, given a criterion) of ``predict(images) -> logits`` over a loader."""
    batch_time = AverageMeter("Time", ":6.3f", Summary.NONE)
    losses = AverageMeter("Loss", ":.4e", Summary.NONE)
    top1 = AverageMeter("Acc@1", ":6.2f", Summary.AVERAGE)
    top5 = AverageMeter("Acc@5", ":6.2f", Summary.AVERAGE)
    meters = [batch_time] + ([losses] if criterion is not None else []) + [top1, top5]
    progress = ProgressMeter(len(val_loader), meters, prefix=f"{prefix}: ", print_freq=args.print_freq * 5)
    from suites.imagenet.data import skipped_images
    skipped_before = skipped_images(val_loader.dataset)
    end = time.time()
    try:
        for i, (images, target) in enumerate(val_loader):
            if device is not None:
                images, target = images.to(device), target.to(device)
            output = predict(images)
            if criterion is not None:
                losses.update(criterion(output, target).item(), images.size(0))
            acc1, acc5 = accuracy(output, target, topk=(1, 5))
            top1.update(acc1[0], images.size(0))
            top5.update(acc5[0], images.size(0))
            batch_time.update(time.time() - end)
            end = time.time()
            progress.step(i)
    finally:
        progress.close()
    progress.display_summary()
    report_skips(val_loader, skipped_before, prefix)
    return top1.avg, top5.avg


def validate(val_loader, model, criterion, args, device=None, prefix="Test"):
    model.eval()
    fmt = input_format(model)

    def predict(images):
        with autocast(args):
            return model(images.contiguous(memory_format=fmt)).float()

    return _score(val_loader, predict, args, prefix, criterion, device or args.device)


def validate_onnx(val_loader, onnx_path: str, onnx_batch: int, args, prefix="ORT"):
    """Top-1/top-5 of an exported model in onnxruntime; batches are cut / zero-padded to the file's batch."""
    from ts_qat_pytorch.onnx.verify import ort_session, run_in_batches
    sess = ort_session(onnx_path, threads=torch.get_num_threads())

    def predict(images):
        return torch.from_numpy(run_in_batches(sess, images.numpy().astype(np.float32), onnx_batch)[0])

    return _score(val_loader, predict, args, prefix)


def make_optimizer(params, optim: str, lr: float, momentum: float, wd: float):
    params = [p for p in params if p.requires_grad]
    if optim == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int = 0):
    """Per-step schedule: linear warm-up then cosine to 0."""
    total_steps = max(1, total_steps)

    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        prog = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * prog))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)
