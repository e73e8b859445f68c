#!/usr/bin/env python
"""ImageNet quantization-aware training with ts_qat_pytorch (descended from pytorch/examples imagenet).

    python suites/imagenet/main.py                                # embedded default (no downloads beyond
                                                                  # the cached real assets), see README.md
    python suites/imagenet/main.py --data /imagenet -a resnet18 --pretrained -b 256 --lr 1e-4 --epochs 1
    torchrun --nproc_per_node 2 suites/imagenet/main.py --dist-backend gloo ...

Without --data the embedded default runs: torchvision mobilenet_v2 with real ImageNet weights and a new
10-class head on Fashion-MNIST (grey -> 3 channels, 64x64, ImageNet normalisation):
float fine-tune (cached) -> float eval -> calibration -> QAT with kd from the float model -> ONNX export
-> int8 evaluation in onnxruntime. Every stage's result and wall time lands in one metrics JSON.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import warnings

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:  # running the file directly from a checkout
    sys.path.insert(0, _REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils.data  # noqa: E402

from suites.common.meters import AverageMeter, ProgressMeter, Summary, accuracy  # noqa: E402

logger = logging.getLogger("imagenet")

# Embedded default recipe (no --data). Every value can be overridden on the command line.
EMBEDDED_RECIPE = dict(
    arch="mobilenet_v2", num_classes=10, image_size=64,
    # float fine-tune of the ImageNet weights with the new head (cached, reused when valid)
    float_epochs=2, float_images=45000, float_lr=2e-3,
    # QAT
    epochs=1, batch_size=64, lr=5e-5, optim="adam", weight_decay=0.0, train_images=6400, freeze_bn_epoch=0,
    calib_batches=32, print_freq=20, workers=0, distill_method="kd",
)
GENERAL_RECIPE = dict(
    arch="resnet18", num_classes=1000, image_size=224,
    epochs=90, batch_size=256, lr=0.1, optim="sgd", weight_decay=1e-4, train_images=None,
    calib_batches=32, print_freq=100, workers=4, distill_method=None,
)


from suites.imagenet.data import DataError  # noqa: E402


class SuiteError(Exception):
    """A bad input, reported before long work starts."""


BAD_INPUT = (SuiteError, DataError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="ts_qat_pytorch ImageNet QAT (pytorch/examples descendant)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", metavar="DIR", default=None,
                   help="ImageFolder root with train/ and val/; absent: the embedded Fashion-MNIST default")
    p.add_argument("--model-zoo", default="torchvision", choices=["torchvision", "timm"])
    p.add_argument("-a", "--arch", metavar="ARCH", default=None,
                   help="model architecture (default: resnet18 with --data, mobilenet_v2 embedded)")
    p.add_argument("--teacher-arch", default="resnet101", help="teacher for distillation (--data runs)")
    p.add_argument("-nc", "--num-classes", type=int, default=None, help="classes (default 1000; embedded 10)")
    p.add_argument("-j", "--workers", type=int, default=None, metavar="N", help="data loading workers (4; embedded 0)")
    p.add_argument("--epochs", type=int, default=None, metavar="N", help="QAT epochs (90; embedded 1)")
    p.add_argument("--start-epoch", type=int, default=0, metavar="N", help="manual epoch number (on restarts)")
    p.add_argument("-b", "--batch-size", type=int, default=None, metavar="N",
                   help="total mini-batch size over all processes (256; embedded 64)")
    p.add_argument("--lr", "--learning-rate", type=float, default=None, dest="lr",
                   help="initial learning rate (0.1; embedded 5e-5 with adam)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", "--weight-decay", type=float, default=None, dest="weight_decay",
                   help="weight decay (1e-4; embedded 0)")
    p.add_argument("-p", "--print-freq", type=int, default=None, help="log every N batches (100; embedded 20)")
    p.add_argument("--resume", default="", metavar="PATH", help="QAT checkpoint to resume (epoch, optimizer, "
                   "LR schedule, fake-quant state, RNG)")
    p.add_argument("-e", "--evaluate", action="store_true", help="evaluate (and export) only")
    p.add_argument("--pretrained", action="store_true", help="start from the zoo's pre-trained weights")
    p.add_argument("--world-size", type=int, default=-1, help="number of nodes (or processes under torchrun)")
    p.add_argument("--rank", type=int, default=-1, help="node rank")
    p.add_argument("--dist-url", default="env://", help="url used to set up distributed training")
    p.add_argument("--dist-backend", default="nccl", help="distributed backend (gloo is used on CPU)")
    p.add_argument("--seed", type=int, default=None, help="seed (embedded default: 0)")
    p.add_argument("--gpu", type=int, default=None, help="GPU id to use")
    p.add_argument("--multiprocessing-distributed", action="store_true",
                   help="launch N processes per node (N = GPUs, or 2 on CPU) with DistributedDataParallel")
    p.add_argument("--model-path", default="", help="float weights (state_dict) to start from")
    p.add_argument("--teacher-path", default="", help="teacher weights (state_dict)")
    p.add_argument("--backend", default="TSQAT", choices=["TSQAT", "Experimental"])
    p.add_argument("--w-bit", type=int, default=None, help="weight bits (Experimental backend)")
    p.add_argument("--a-bit", type=int, default=None, help="activation bits (Experimental backend)")
    p.add_argument("--optim", default=None, choices=["sgd", "adam"],
                   help="optimizer (sgd; embedded adam = AdamW)")
    p.add_argument("--not-qat", action="store_true", help="float training / evaluation, no quantization")
    p.add_argument("-l", "--log-level", type=int, default=1, choices=[0, 1, 2, 3],
                   help="0 debug, 1 info, 2 warning, 3 error")
    p.add_argument("--profile", action="store_true",
                   help="per-layer float vs fake-quant comparison (table, CSV and PNG in --output-dir)")
    p.add_argument("--distill-method", default=None, choices=["kd", "none"],
                   help="distillation (kd = KL of softened logits * T^2; default: kd embedded, none with --data)")
    p.add_argument("--distill-alpha", type=float, default=0.95, help="loss = alpha*KD + (1-alpha)*CE")
    p.add_argument("--temperature", type=float, default=6.0)
    p.add_argument("--amp", action="store_true", help="automatic mixed precision (bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--onnx-batch", type=int, default=1, help="batch size baked into the exported ONNX")
    p.add_argument("--opset-version", type=int, default=18)
    p.add_argument("--output-dir", default="checkpoint", help="checkpoints, ONNX, qparams, profile")
    p.add_argument("--metrics", default=None, help="metrics JSON path (default <output-dir>/<arch>_metrics.json)")
    # recipe details (defaults depend on embedded / --data, see the recipes at the top of this file)
    p.add_argument("--image-size", type=int, default=None, help="input resolution (224; embedded 64)")
    p.add_argument("--calib-batches", type=int, default=None, help="calibration batches (32)")
    p.add_argument("--train-images", type=int, default=None,
                   help="QAT on a random subset of this many training images per epoch (embedded 6400)")
    p.add_argument("--val-images", type=int, default=None, help="evaluate on the first N validation images")
    p.add_argument("--float-epochs", type=int, default=None, help="embedded float fine-tune epochs (2)")
    p.add_argument("--float-images", type=int, default=None, help="embedded float fine-tune images per epoch (45000)")
    p.add_argument("--float-lr", type=float, default=None, help="embedded float fine-tune peak lr (2e-3, AdamW)")
    p.add_argument("--freeze-bn-epoch", type=int, default=None,
                   help="freeze BN statistics from this epoch (embedded 0: BN uses its running statistics in QAT)")
    p.add_argument("--stop-after-epochs", type=int, default=None,
                   help="leave after this many epochs of this run (time-sliced jobs); --resume continues")
    p.add_argument("--no-export", action="store_true", help="no ONNX export (checkpoints only)")
    p.add_argument("--no-ort-eval", action="store_true", help="skip the onnxruntime evaluation")
    p.add_argument("--cache-dir", default=None, help="float fine-tune cache (default $TS_QAT_CACHE/imagenet)")
    p.add_argument("--baselines", default=None,
                   help="compare the metrics with this baselines.json at the end; exit 1 on failure")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; $TS_QAT_THREADS)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny run of the whole pipeline (a few hundred images, a few steps) for tests")
    return p


# ----------------------------------------------------------------------------------------------------
# set-up helpers


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    args.embedded = args.data is None
    recipe = EMBEDDED_RECIPE if args.embedded else GENERAL_RECIPE
    for k, v in recipe.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for k in ("float_epochs", "float_images", "float_lr"):
        if getattr(args, k) is None:
            setattr(args, k, EMBEDDED_RECIPE[k])
    if args.freeze_bn_epoch is not None and args.freeze_bn_epoch < 0:
        args.freeze_bn_epoch = None
    if args.distill_method == "none":
        args.distill_method = None
    if args.seed is None and args.embedded:
        args.seed = 0
    if args.smoke:
        small = dict(float_images=256, float_epochs=1, train_images=128, val_images=256, calib_batches=2,
                     batch_size=32, print_freq=2)
        for k, v in small.items():
            cur = getattr(args, k)
            setattr(args, k, v if cur is None or cur == recipe.get(k, EMBEDDED_RECIPE.get(k)) else cur)
    if args.embedded and args.num_classes != 10:
        raise SuiteError(f"the embedded Fashion-MNIST default has 10 classes, -nc/--num-classes is "
                         f"{args.num_classes}")
    if args.backend == "TSQAT" and (args.w_bit or args.a_bit) and (args.w_bit, args.a_bit) != (8, 8):
        raise SuiteError("--w-bit/--a-bit need --backend Experimental (TSQAT is int8)")
    if args.onnx_batch < 1 or args.batch_size < 1:
        raise SuiteError("--onnx-batch and --batch-size must be >= 1")
    return args


def set_log_level(level: int) -> None:
    lvl = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR][level]
    logging.basicConfig(level=lvl, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for name in ("ts_qat_pytorch", "imagenet", "suites"):
        logging.getLogger(name).setLevel(lvl)
    if level >= 1:
        for noisy in ("torch.onnx", "onnxscript", "torch._dynamo", "torch.export", "torch.fx"):
            logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))


def is_main(args) -> bool:
    return not getattr(args, "distributed", False) or args.rank == 0


def say(args, msg: str) -> None:
    if is_main(args):
        print(msg, flush=True)


def list_archs(zoo: str) -> list[str]:
    if zoo == "timm":
        import timm
        return list(timm.list_models())
    import torchvision.models as models
    return sorted(models.list_models(module=models))


def check_arch(arch: str, zoo: str, what: str = "--arch") -> None:
    names = list_archs(zoo)
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; see the {zoo} model list"
        raise SuiteError(f"unknown {what} '{arch}' for --model-zoo {zoo}{hint}")


def create_model(arch: str, zoo: str, num_classes: int, pretrained: bool) -> nn.Module:
    if zoo == "timm":
        import timm
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes)
    import torchvision.models as models
    if arch == "mobilenet_v2" and pretrained:
        from suites.common.assets import install_torchvision_weights
        install_torchvision_weights()
    weights = None
    if pretrained:  # mobilenet_v2: the V1 file is the one shipped offline (suites.common.assets)
        weights = "IMAGENET1K_V1" if arch == "mobilenet_v2" else "DEFAULT"
    model = models.get_model(arch, weights=weights)
    if num_classes != _num_outputs(model):
        replace_head(model, num_classes)
    return model


def _head(model: nn.Module) -> tuple[nn.Module, str, nn.Linear] | None:
    for attr in ("fc", "classifier", "head", "heads"):
        m = getattr(model, attr, None)
        if isinstance(m, nn.Linear):
            return model, attr, m
        if isinstance(m, nn.Sequential):
            for i in reversed(range(len(m))):
                if isinstance(m[i], nn.Linear):
                    return m, str(i), m[i]
    return None


def _num_outputs(model: nn.Module) -> int | None:
    h = _head(model)
    return h[2].out_features if h else None


def replace_head(model: nn.Module, num_classes: int) -> None:
    h = _head(model)
    if h is None:
        raise SuiteError(f"cannot find the classifier of {type(model).__name__} to resize it to {num_classes} "
                         "classes")
    parent, attr, lin = h
    new = nn.Linear(lin.in_features, num_classes, bias=lin.bias is not None)
    if isinstance(parent, nn.Sequential):
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def read_state_dict(path: str, what: str) -> dict:
    from ts_qat_pytorch.utils.utils import load_checkpoint, strip_module_prefix
    try:
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:
        raise SuiteError(f"{what}: {exc}") from exc
    if isinstance(ckpt, dict) and "state_dict" in ckpt and isinstance(ckpt["state_dict"], dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) or k.endswith("_extra_state") for k, v in ckpt.items()):
        raise SuiteError(f"{what}: '{path}' is not a state_dict (a dict of tensors)")
    return strip_module_prefix(ckpt)


def check_shapes(model: nn.Module, sd: dict, path: str, num_classes: int, what: str, partial: bool = False) -> None:
    """Clear errors for a checkpoint that does not fit the model (number of classes named first)."""
    own = model.state_dict()
    head = _head(model)
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            if own[k].dim() >= 1 and own[k].shape[0] == num_classes and v.shape[0] != num_classes and (
                    head is None or own[k].shape[1:] == v.shape[1:]):
                raise SuiteError(f"{what} '{path}' has {v.shape[0]} classes but -nc/--num-classes is "
                                 f"{num_classes} (tensor '{k}': {tuple(v.shape)} vs {tuple(own[k].shape)})")
            raise SuiteError(f"{what} '{path}' does not fit the model: '{k}' is {tuple(v.shape)} in the file "
                             f"and {tuple(own[k].shape)} in the model")
    if partial:
        return
    missing = [k for k in own if k not in sd and not k.endswith(("._extra_state", "num_batches_tracked"))]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise SuiteError(f"{what} '{path}' does not match the architecture: {len(missing)} missing keys "
                         f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")


def load_float_weights(model: nn.Module, path: str, num_classes: int, what: str) -> None:
    sd = read_state_dict(path, what)
    if any(".weight_fake_quant." in k or k.endswith("_fake_quant.scale") for k in sd):
        raise SuiteError(f"{what} '{path}' is a QAT checkpoint; resume it with --resume")
    check_shapes(model, sd, path, num_classes, what)
    model.load_state_dict(sd, strict=False)


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
    np.random.set_state(("MT19937", np.asarray(torch.as_tensor(st["numpy"]).numpy(), dtype=np.uint32), int(st["numpy_pos"]), 0, 0.0))
    random.setstate(ast.literal_eval(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ----------------------------------------------------------------------------------------------------
# data


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
        from suites.imagenet.data import imagefolder_datasets
        train, val, calib = imagefolder_datasets(args.data, args.image_size)
        if len(train.classes) > args.num_classes:
            raise SuiteError(f"--data '{args.data}' has {len(train.classes)} classes but -nc/--num-classes is "
                             f"{args.num_classes}")
        if len(train.classes) < args.num_classes:
            logger.warning("--data has %d classes, the model %d outputs", len(train.classes), args.num_classes)
    if args.val_images:
        val = torch.utils.data.Subset(val, range(min(args.val_images, len(val))))
    return train, val, calib


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


# ----------------------------------------------------------------------------------------------------
# train / validate


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
    end = time.time()
    try:
        for i, (images, target) in enumerate(train_loader):
            data_time.update(time.time() - end)
            images = images.to(device, non_blocking=True)
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
    return top1.avg, top5.avg


def validate(val_loader, model, criterion, args, device=None, prefix="Test"):
    model.eval()

    def predict(images):
        with autocast(args):
            return model(images).float()

    return _score(val_loader, predict, args, prefix, criterion, device or args.device)


def validate_onnx(val_loader, onnx_path: str, input_name: str, onnx_batch: int, args, prefix="ORT"):
    """Top-1/top-5 of an exported model in onnxruntime; batches are cut / zero-padded to the file's batch."""
    from ts_qat_pytorch.onnx.verify import ort_session
    sess = ort_session(onnx_path, threads=torch.get_num_threads())

    def predict(images):
        x = images.numpy().astype(np.float32)
        outs = []
        for s in range(0, len(x), onnx_batch):
            chunk = x[s:s + onnx_batch]
            n = len(chunk)
            if n < onnx_batch:
                chunk = np.concatenate([chunk, np.zeros((onnx_batch - n, *chunk.shape[1:]), np.float32)])
            outs.append(sess.run(None, {input_name: chunk})[0][:n])
        return torch.from_numpy(np.concatenate(outs))

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


# ----------------------------------------------------------------------------------------------------
# stages


class Stages:
    """Wall time and results of each stage, collected into the metrics JSON."""

    def __init__(self, args):
        self.args = args
        self.metrics: dict = {"suite": "imagenet", "embedded": args.embedded, "arch": args.arch,
                              "backend": None if args.not_qat else args.backend, "times_s": {}}
        self.t0 = time.time()

    def timed(self, name):
        stages = self

        class _T:
            def __enter__(self):
                self.t = time.time()
                say(stages.args, f"==> stage {name}")
                return self

            def __exit__(self, *exc):
                dt = time.time() - self.t
                stages.metrics["times_s"][name] = round(dt + stages.metrics["times_s"].get(name, 0.0), 2)
                if exc[0] is None:
                    say(stages.args, f"==> stage {name} done in {dt:.1f} s")
        return _T()

    def write(self):
        args = self.args
        self.metrics["times_s"]["total"] = round(time.time() - self.t0, 2)
        if not is_main(args):
            return
        from ts_qat_pytorch.utils.utils import atomic_write_bytes
        atomic_write_bytes(args.metrics, (json.dumps(self.metrics, indent=2, default=str) + "\n").encode())


def float_cache_path(args) -> str:
    key = dict(arch=args.arch, image_size=args.image_size, float_epochs=args.float_epochs,
               float_images=args.float_images, float_lr=args.float_lr, batch_size=args.batch_size, seed=args.seed,
               recipe=1)
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    from suites.common.assets import cache_dir
    folder = args.cache_dir or os.path.join(cache_dir(), "imagenet")
    return os.path.join(folder, f"{args.arch}_fmnist_float_{h}.pth"), key


def embedded_float_stage(model, train_ds, args, stages: Stages):
    """Fine-tune the ImageNet weights on Fashion-MNIST (or reuse the cached result)."""
    from ts_qat_pytorch.utils.utils import atomic_torch_save, load_checkpoint
    path, key = float_cache_path(args)
    if os.path.exists(path):
        try:
            ck = load_checkpoint(path)
            if ck.get("key") != key:
                raise ValueError("recipe differs")
            model.load_state_dict(ck["state_dict"])
            say(args, f"=> reusing the fine-tuned float model {path}")
            stages.metrics["float_cached"] = True
            stages.metrics["times_s"]["float_train"] = 0.0
            return
        except Exception as exc:  # noqa: BLE001 - any problem: train again
            logger.warning("float cache %s unusable (%s); fine-tuning again", path, exc)
    stages.metrics["float_cached"] = False
    with stages.timed("float_train"):
        if is_main(args):
            sampler = EpochSubsetSampler(len(train_ds), args.float_images, args.seed + 7)
            dl = loader(train_ds, args.batch_size, args.workers, sampler=sampler)
            steps = len(dl) * args.float_epochs
            opt = torch.optim.AdamW(model.parameters(), lr=args.float_lr, weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.float_lr, total_steps=max(2, steps),
                                                        pct_start=0.15)
            model.to(args.device)
            for ep in range(args.float_epochs):
                sampler.set_epoch(ep)
                train(dl, model, nn.CrossEntropyLoss(), opt, sched, ep, args.device, args, prefix="Float")
            model.cpu()
            atomic_torch_save({"state_dict": model.state_dict(), "key": key}, path)
            say(args, f"=> fine-tuned float model cached at {path}")
        if getattr(args, "distributed", False):
            dist.barrier()
            if not is_main(args):
                model.load_state_dict(load_checkpoint(path)["state_dict"])


def build_teacher(args, student_float: nn.Module) -> nn.Module | None:
    if not args.distill_method:
        return None
    if args.embedded and not args.teacher_path:
        teacher = copy.deepcopy(student_float)
    else:
        teacher = create_model(args.teacher_arch, args.model_zoo, args.num_classes,
                               pretrained=not args.teacher_path)
        if args.teacher_path:
            load_float_weights(teacher, args.teacher_path, args.num_classes, "--teacher-path")
    with torch.no_grad():
        out = teacher.eval()(torch.zeros(1, 3, args.image_size, args.image_size))
    if out.shape[-1] != args.num_classes:
        raise SuiteError(f"teacher {args.teacher_arch} predicts {out.shape[-1]} classes but -nc/--num-classes is "
                         f"{args.num_classes}; give --teacher-path with a {args.num_classes}-class teacher")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(args.device).eval()


def prepare(model, args):
    from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
    cfg = None
    if args.backend == "Experimental":
        w, a = args.w_bit or 8, args.a_bit or 8
        cfg = {"extra_qconfig_dict": {"w_qscheme": {"bit": w}, "a_qscheme": {"bit": a}}}
    return prepare_by_platform(model, BackendType(args.backend), cfg)


def export_stage(q, args, stages, name_suffix="onnx_quantization", record=True):
    from ts_qat_pytorch.convert_export import convert_export
    out = os.path.join(args.output_dir, f"{args.arch}_{name_suffix}.onnx")
    qp = os.path.join(args.output_dir, f"{args.arch}_{name_suffix}_qparams.json")
    dummy = torch.randn(1, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    r = convert_export(getattr(q, "module", q).cpu(), dummy, out, opset_version=args.opset_version,
                       batch_size=args.onnx_batch, qparams_path=qp)
    getattr(q, "module", q).to(args.device)
    if record:
        stages.metrics.update(onnx_path=r.onnx_path, qparams_path=r.qparams_path, exporter=r.exporter,
                              opset_version=r.opset_version, onnx_batch=args.onnx_batch,
                              input_name=r.input_names[0], quantized_layers=r.quantized_layers,
                              integer_kernels=r.integer_kernels, integer_matmul_kernels=r.integer_matmul_kernels,
                              integer_kernels_total=sum(r.integer_kernels.values()),
                              export_max_abs_diff=max(r.max_abs_diff) if r.max_abs_diff else None)
        say(args, f"=> exported {r.onnx_path} ({r.exporter}, opset {r.opset_version}): "
                  f"{r.quantized_layers} quantized layers, integer kernels {r.integer_kernels}, "
                  f"max |ORT - PyTorch| {r.max_abs_diff}")
    return r


def profile_stage(q, calib_loader, args, stages):
    from suites.common import profiler
    rows = profiler.profile_layers(q, calib_loader, max_batches=2)
    csv_path = os.path.join(args.output_dir, f"{args.arch}_profile.csv")
    png_path = os.path.join(args.output_dir, f"{args.arch}_profile.png")
    profiler.write_csv(rows, csv_path)
    profiler.plot(rows, png_path, title=f"{args.arch} {args.backend}: float vs fake-quant per layer")
    say(args, "=> per-layer float vs fake-quant (worst first)\n" + profiler.format_table(rows, limit=25))
    say(args, f"=> profile written to {csv_path} and {png_path}")
    stages.metrics["profile"] = {"csv": csv_path, "png": png_path, "layers": len(rows),
                                 "worst_layer": rows[0]["layer"] if rows else None,
                                 "worst_sqnr_db": rows[0]["sqnr_db"] if rows else None}


def checkpoint_paths(args):
    d, a = args.output_dir, args.arch
    return dict(ckpt=os.path.join(d, f"{a}_checkpoint.pth"), best=os.path.join(d, f"{a}_model_best.pth"),
                float=os.path.join(d, f"{a}_checkpoint_float.pth"), qparams=os.path.join(d, f"{a}_qparams.json"),
                onnx=os.path.join(d, f"{a}_onnx_quantization.onnx"),
                bestonnx=os.path.join(d, f"{a}_bestonnx_quantization.onnx"))


def atomic_copy(src: str, dst: str) -> None:
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# ----------------------------------------------------------------------------------------------------
# main


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    set_log_level(args.log_level)
    threads = args.threads or int(os.environ.get("TS_QAT_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        args = resolve_args(args)
        if args.seed is not None and not args.embedded:
            warnings.warn("You have chosen to seed training. This will turn on the CUDNN deterministic setting, "
                          "which can slow down your training considerably!")
        if args.metrics is None:
            args.metrics = os.path.join(args.output_dir, f"{args.arch}_metrics.json")
        if args.dist_url == "env://" and args.world_size == -1:
            args.world_size = int(os.environ.get("WORLD_SIZE", -1))
        args.distributed = args.world_size > 1 or args.multiprocessing_distributed
        ngpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if args.multiprocessing_distributed:
            nproc = ngpus or 2
            args.world_size = nproc * max(1, args.world_size)
            import torch.multiprocessing as mp
            mp.spawn(main_worker, nprocs=nproc, args=(nproc, args))
            return 0
        return main_worker(args.gpu, ngpus, args)
    except BAD_INPUT as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the last complete checkpoints in {args.output_dir} are intact (writes are atomic)",
              file=sys.stderr, flush=True)
        return 130


def main_worker(gpu, ngpus_per_node, args) -> int:
    if isinstance(gpu, int) and args.multiprocessing_distributed and not torch.cuda.is_available():
        args.local = gpu
        gpu = None
    args.gpu = gpu
    set_log_level(args.log_level)
    if args.distributed:
        if args.dist_url == "env://" and args.rank == -1:
            args.rank = int(os.environ.get("RANK", 0))
        if args.multiprocessing_distributed:
            args.rank = args.rank * ngpus_per_node + (gpu if gpu is not None else args.local) if args.rank >= 0 \
                else (gpu if gpu is not None else args.local)
            if args.dist_url == "env://":
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", "29517")
        backend = args.dist_backend
        if backend == "nccl" and not torch.cuda.is_available():
            backend = "gloo"
        dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=args.world_size,
                                rank=args.rank)
    try:
        return run(args)
    except BAD_INPUT as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        if args.distributed and dist.is_initialized():
            dist.destroy_process_group()


def run(args) -> int:
    stages = Stages(args)
    if torch.cuda.is_available() and (args.gpu is not None or args.distributed):
        gpu = args.gpu if args.gpu is not None else int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(gpu)
        args.device = torch.device("cuda", gpu)
    elif torch.cuda.is_available():
        args.device = torch.device("cuda")
    else:
        args.device = torch.device("cpu")
    if args.seed is not None:
        seed_everything(args.seed)
        torch.backends.cudnn.deterministic = True
    world = dist.get_world_size() if args.distributed else 1
    rank = dist.get_rank() if args.distributed else 0
    if args.distributed:
        args.rank = rank

    # ---- validate everything cheap before long work
    check_arch(args.arch, args.model_zoo)
    qat = not args.not_qat
    if qat and not args.embedded and not (args.pretrained or args.model_path or args.resume):
        raise SuiteError("QAT fine-tunes a trained model: give one of --pretrained, --model-path or --resume "
                         "(or --not-qat to train a float model from scratch)")
    if args.distill_method and not args.embedded and not args.teacher_path:
        check_arch(args.teacher_arch, args.model_zoo, "--teacher-arch")
    for flag, path in (("--model-path", args.model_path), ("--resume", args.resume),
                       ("--teacher-path", args.teacher_path)):
        if path:
            read_state_dict(path, flag)  # readable, a state_dict
    if args.resume and args.not_qat:
        raise SuiteError("--resume restores QAT checkpoints; with --not-qat use --model-path")
    train_ds, val_ds, calib_ds = make_datasets(args)
    os.makedirs(args.output_dir, exist_ok=True)
    paths = checkpoint_paths(args)
    stages.metrics.update(num_classes=args.num_classes, image_size=args.image_size, world_size=world,
                          val_images=len(val_ds), batch_size=args.batch_size,
                          dataset="fashion-mnist" if args.embedded else args.data)

    # ---- float model
    model = create_model(args.arch, args.model_zoo, args.num_classes,
                         pretrained=args.pretrained or (args.embedded and not args.model_path))
    if args.model_path:
        load_float_weights(model, args.model_path, args.num_classes, "--model-path")
        say(args, f"=> loaded float weights '{args.model_path}'")
    per_rank_batch = max(1, args.batch_size // world)
    val_loader = loader(val_ds, max(per_rank_batch, 100 if args.embedded else per_rank_batch), args.workers)
    criterion = nn.CrossEntropyLoss().to(args.device)

    if args.embedded and not args.model_path:
        embedded_float_stage(model, train_ds, args, stages)
    model.to(args.device)

    if args.embedded or (args.evaluate and not qat):
        if is_main(args):
            with stages.timed("float_eval"):
                acc1, acc5 = validate(val_loader, model, criterion, args, prefix="Float")
            stages.metrics.update(float_top1=round(acc1, 3), float_top5=round(acc5, 3))
            say(args, f"=> float top-1 {acc1:.3f} top-5 {acc5:.3f}")
    if not qat:
        if not args.embedded and not args.evaluate:
            train_float(model, train_ds, val_loader, criterion, args, stages, paths)
        stages.write()
        return finish(args, stages)

    # ---- QAT: teacher (checked before long work), prepare, calibrate (unless resuming), train, export
    teacher = build_teacher(args, model) if not args.evaluate else None
    q = prepare(model, args).to(args.device)
    calib_loader = loader(calib_ds, per_rank_batch, args.workers,
                          sampler=EpochSubsetSampler(len(calib_ds), args.calib_batches * per_rank_batch,
                                                     (args.seed or 0) + 13))
    from ts_qat_pytorch.utils.state import enable_calibration, enable_quantization, freeze_bn_stats
    if not args.resume:
        with stages.timed("calibration"):
            q.eval()
            enable_calibration(q)
            with torch.no_grad():
                for i, (images, _t) in enumerate(calib_loader):
                    q(images.to(args.device))
            enable_quantization(q)
        say(args, f"=> calibrated on {len(calib_loader.sampler)} images ({len(calib_loader)} batches)")
    del model

    steps_per_epoch = None
    train_sampler = EpochSubsetSampler(len(train_ds), args.train_images, args.seed or 0, rank, world)
    train_loader = loader(train_ds, per_rank_batch, args.workers, sampler=train_sampler)
    steps_per_epoch = len(train_loader)
    optimizer = make_optimizer(q.parameters(), args.optim, args.lr, args.momentum, args.weight_decay)
    scheduler = cosine_schedule(optimizer, steps_per_epoch * args.epochs)
    best_acc1 = 0.0
    start_epoch = args.start_epoch
    if args.resume:
        from ts_qat_pytorch.utils.utils import load_qat_checkpoint
        sd = read_state_dict(args.resume, "--resume")
        if not any("fake_quant" in k for k in sd):
            raise SuiteError(f"--resume '{args.resume}' is not a QAT checkpoint (no fake-quant state); give float "
                             "weights with --model-path")
        # the layers' shapes (quantizer buffers may be shaped lazily: load_qat_checkpoint handles them)
        check_shapes(q, {k: v for k, v in sd.items() if "fake_quant" not in k and "post_process" not in k},
                     args.resume, args.num_classes, "--resume", partial=True)
        try:
            ck = load_qat_checkpoint(args.resume, q, optimizer, scheduler)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise SuiteError(f"--resume '{args.resume}': {exc}") from exc
        start_epoch = int(ck.get("epoch", 0))
        best_acc1 = float(ck.get("best_acc1", 0.0))
        set_rng_state(ck.get("rng", {}))
        say(args, f"=> resumed '{args.resume}' at epoch {start_epoch} (best Acc@1 {best_acc1:.3f})")
    if not args.resume and args.seed is not None:
        # QAT's randomness does not depend on whether the float stage ran or came from the cache
        seed_everything(args.seed + 1 + rank)
    qm = q
    if args.distributed:
        qm = nn.parallel.DistributedDataParallel(q, device_ids=[args.device.index] if args.device.type == "cuda"
                                                 else None)
    scaler = torch.amp.GradScaler("cuda") if args.amp and args.device.type == "cuda" else None

    if args.evaluate:
        acc1 = evaluate_qat(q, val_loader, criterion, args, stages)
        if args.profile and is_main(args):
            profile_stage(q, calib_loader, args, stages)
        if is_main(args) and not args.no_export:
            with stages.timed("export"):
                r = export_stage(q, args, stages)
            ort_stage(val_loader, r, args, stages)
        stages.write()
        return finish(args, stages)

    acc1 = None
    last_epoch = args.epochs
    if args.stop_after_epochs is not None:
        last_epoch = min(args.epochs, start_epoch + args.stop_after_epochs)
    for epoch in range(start_epoch, last_epoch):
        train_sampler.set_epoch(epoch)
        if args.freeze_bn_epoch is not None and epoch >= args.freeze_bn_epoch:
            freeze_bn_stats(q)
        with stages.timed("qat_train"):
            tr_acc, tr_loss = train(train_loader, qm, criterion, optimizer, scheduler, epoch, args.device, args,
                                    teacher=teacher, scaler=scaler)
        stages.metrics.update(qat_train_top1=round(tr_acc, 3), qat_train_loss=tr_loss,
                              qat_steps=steps_per_epoch * (epoch + 1), qat_images_per_epoch=len(train_sampler) * world)
        acc1 = evaluate_qat(q, val_loader, criterion, args, stages)
        if args.distributed:
            t = torch.tensor([acc1 if is_main(args) else 0.0], dtype=torch.float64)
            dist.broadcast(t, 0)
            acc1 = float(t[0])
        is_best = acc1 > best_acc1
        best_acc1 = max(acc1, best_acc1)
        if is_main(args):
            save_checkpoint_all(q, optimizer, scheduler, epoch + 1, best_acc1, is_best, paths, args, stages)
        if args.distributed:
            dist.barrier()
    if acc1 is None:
        say(args, f"=> nothing to train: start epoch {start_epoch} >= --epochs {args.epochs}")
        acc1 = evaluate_qat(q, val_loader, criterion, args, stages)
        if is_main(args) and not args.no_export:
            with stages.timed("export"):
                export_stage(q, args, stages)
    if args.distributed:
        replica_check(q, args, stages)
    if args.profile and is_main(args):
        profile_stage(q, calib_loader, args, stages)
    if is_main(args) and "onnx_path" in stages.metrics:
        ort_stage(val_loader, None, args, stages)
    stages.metrics["best_acc1"] = round(best_acc1, 3)
    stages.write()
    return finish(args, stages)


def state_digests(model: nn.Module) -> dict[str, str]:
    """sha256 of each tensor of the state_dict (shape and bytes)."""
    out = {}
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            h = hashlib.sha256(str(tuple(v.shape)).encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            out[k] = h.hexdigest()
    return out


def replica_check(q, args, stages) -> None:
    """After distributed QAT every rank must hold the same weights, scales and observer state: gather each rank's
    state digests, record one digest per rank in the metrics and name the tensors that differ, if any."""
    mine = state_digests(q)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    digests = [hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest() for d in gathered]
    same = len(set(digests)) == 1
    stages.metrics.update(replica_digests=digests, replicas_identical=same)
    if same:
        say(args, f"=> all {len(digests)} ranks hold identical weights and quantizer state ({digests[0][:12]})")
    elif is_main(args):
        diff = [k for k in gathered[0] if any(g.get(k) != gathered[0][k] for g in gathered[1:])]
        logger.error("ranks ended with different model state in %d tensors: %s", len(diff), ", ".join(diff[:20]))


def evaluate_qat(q, val_loader, criterion, args, stages) -> float:
    if not is_main(args):
        return 0.0
    with stages.timed("qat_eval"):
        acc1, acc5 = validate(val_loader, q, criterion, args, prefix="QAT")
    stages.metrics.update(qat_top1=round(acc1, 3), qat_top5=round(acc5, 3))
    if "float_top1" in stages.metrics:
        stages.metrics["qat_minus_float"] = round(acc1 - stages.metrics["float_top1"], 3)
    say(args, f"=> QAT (fake-quant) top-1 {acc1:.3f} top-5 {acc5:.3f}")
    return acc1


def ort_stage(val_loader, r, args, stages) -> None:
    if args.no_ort_eval:
        return
    with stages.timed("ort_eval"):
        acc1, acc5 = validate_onnx(val_loader, stages.metrics["onnx_path"], stages.metrics["input_name"],
                                   args.onnx_batch, args, prefix="ORT int8")
    stages.metrics.update(ort_top1=round(acc1, 3), ort_top5=round(acc5, 3))
    if "qat_top1" in stages.metrics:
        stages.metrics["ort_minus_qat"] = round(acc1 - stages.metrics["qat_top1"], 3)
    say(args, f"=> ORT int8 top-1 {acc1:.3f} top-5 {acc5:.3f} ({stages.metrics['onnx_path']})")


def save_checkpoint_all(q, optimizer, scheduler, epoch, best_acc1, is_best, paths, args, stages) -> None:
    from ts_qat_pytorch.utils.utils import save_checkpoint, save_qat_checkpoint
    rng = rng_state()
    save_qat_checkpoint(paths["ckpt"], q, optimizer, scheduler, epoch=epoch, best_acc1=best_acc1, arch=args.arch,
                        num_classes=args.num_classes, backend=args.backend, rng=rng)
    save_checkpoint(q, paths["float"], paths["qparams"])
    if not args.no_export:
        with stages.timed("export"):
            export_stage(q, args, stages)
        set_rng_state(rng)  # export draws random numbers; training continues exactly as a resumed run would
    if is_best:
        atomic_copy(paths["ckpt"], paths["best"])
        if not args.no_export:
            atomic_copy(paths["onnx"], paths["bestonnx"])
    say(args, f"=> saved {paths['ckpt']}{' (best)' if is_best else ''}, {paths['float']}, {paths['qparams']}")


def train_float(model, train_ds, val_loader, criterion, args, stages, paths) -> None:
    """Plain float training with --data --not-qat (pytorch/examples behaviour, cosine per-step LR)."""
    from ts_qat_pytorch.utils.utils import atomic_torch_save
    world = dist.get_world_size() if args.distributed else 1
    rank = dist.get_rank() if args.distributed else 0
    sampler = EpochSubsetSampler(len(train_ds), args.train_images, args.seed or 0, rank, world)
    dl = loader(train_ds, max(1, args.batch_size // world), args.workers, sampler=sampler)
    m = model
    if args.distributed:
        m = nn.parallel.DistributedDataParallel(model, device_ids=[args.device.index]
                                                if args.device.type == "cuda" else None)
    opt = make_optimizer(model.parameters(), args.optim, args.lr, args.momentum, args.weight_decay)
    sched = cosine_schedule(opt, len(dl) * args.epochs)
    best = 0.0
    for epoch in range(args.start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        with stages.timed("float_train"):
            train(dl, m, criterion, opt, sched, epoch, args.device, args)
        if is_main(args):
            with stages.timed("float_eval"):
                acc1, acc5 = validate(val_loader, model, criterion, args, prefix="Float")
            stages.metrics.update(float_top1=round(acc1, 3), float_top5=round(acc5, 3))
            atomic_torch_save(model.state_dict(), paths["float"])
            if acc1 > best:
                best = acc1
                atomic_copy(paths["float"], os.path.join(args.output_dir, f"{args.arch}_model_best_float.pth"))


def finish(args, stages) -> int:
    m = stages.metrics
    if not is_main(args):
        return 0
    keys = ["float_top1", "qat_top1", "ort_top1", "integer_matmul_kernels", "integer_kernels_total"]
    summary = ", ".join(f"{k} {m[k]}" for k in keys if k in m)
    say(args, f"=> metrics: {summary}; times (s) {m['times_s']}")
    say(args, f"=> metrics written to {args.metrics}")
    if args.baselines:
        from suites.common.regression import compare_metrics, format_table
        rows, ok = compare_metrics(m, args.baselines)
        say(args, format_table(rows))
        say(args, "regression: " + ("PASS" if ok else "FAIL"))
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
