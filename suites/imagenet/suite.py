"""The ImageNet suite: its models (torchvision / timm zoo, class heads), its data (ImageFolder or the embedded
Fashion-MNIST default, data.py), its metric (top-1 / top-5, in PyTorch and onnxruntime) and its recipes. The
pipeline is the runner's (suites/common/runner.py)."""
from __future__ import annotations

import difflib
import logging
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data

from suites.common.subsets import val_subset
from suites.common.suite import Data, Metric, Suite, SuiteError
from suites.imagenet.data import DataError

logger = logging.getLogger("imagenet")

EMBEDDED = dict(
    arch="mobilenet_v2", num_classes=10, image_size=64, backend="TSQAT",
    # float fine-tune of the ImageNet weights with the new head (cached, reused when valid)
    float_epochs=2, float_images=45000, float_lr=2e-3,
    # QAT
    epochs=1, batch_size=64, lr=5e-5, optim="adam", weight_decay=0.0, train_images=6400, freeze_bn_epoch=0,
    calib_batches=32, print_freq=20, workers=0, distill_method="kd", val_batch_size=100,
)

# The embedded default below 8 bits (--backend Experimental --w-bit 4 --a-bit 4): 4-bit grids need longer QAT with a
# larger step than int8's touch-up (H200 sweep of the embedded W4A4, first/last layers 8-bit: 100 steps at 5e-5
# -9.0 points, 500 at 1e-4 -3.8, 500 at 5e-4 -2.6, 1000 at 5e-4 -2.3, 500 at 1e-3 diverges; 2-core CPU: 2000 steps
# at 5e-4, cosine to 0, -1.4).
EMBEDDED_LOW_BIT = dict(epochs=4, train_images=32000, lr=5e-4)
# ... and from a --ptq-recon model: the reconstruction has fitted the scales, so QAT moves them 50x slower than the
# weights (Adam steps each by about its lr: 1e-3 is 10 % a step of a 4-bit weight scale of 0.01), after a 100-step
# warm-up, and needs half the steps (2-core CPU, 1 000 steps from the 90.19 PTQ model, float 92.61: everything at
# 5e-4 91.36; with the warm-up 91.54; scales at 2e-5 91.61; weights at 1e-3 91.97; suites/imagenet/README.md).
EMBEDDED_LOW_BIT_FROM_PTQ = dict(epochs=2, lr=1e-3, qparam_lr=2e-5, warmup_steps=100)

# --data: QAT fine-tunes a trained model (--pretrained, --model-path): the manual's demo command, "--lr 1e-4 --optim
# adam --wd 1e-5 --epochs 10". The manual's flag table lists pytorch/examples' defaults, 90 epochs of SGD at lr 0.1:
# training from scratch, which is what --not-qat does with --data (GENERAL_FLOAT).
GENERAL = dict(
    arch="resnet18", num_classes=1000, image_size=224, backend="TSQAT",
    float_epochs=2, float_images=45000, float_lr=2e-3,  # the embedded fine-tune's (unused with --data)
    epochs=10, batch_size=256, lr=1e-4, optim="adam", weight_decay=1e-5, train_images=None,
    calib_batches=32, print_freq=100, workers=4, distill_method=None,
)
GENERAL_FLOAT = dict(epochs=90, lr=0.1, optim="sgd", weight_decay=1e-4)

SMOKE = dict(float_images=256, float_epochs=1, train_images=128, val_images=256, calib_batches=2, batch_size=32,
             print_freq=2)


class ImageNetSuite(Suite):
    name = "imagenet"
    metric = Metric("top1", "higher")
    summary = "top-1 {top1:.3f} top-5 {top5:.3f}"
    errors = (DataError,)
    recipes = {"embedded": EMBEDDED, "general": GENERAL}
    smoke = SMOKE
    cache_tag = "fmnist"

    # ---- command line and recipe
    def add_arguments(self, p) -> None:
        p.add_argument("--model-zoo", default="torchvision", choices=["torchvision", "timm"], help="model zoo")
        p.add_argument("-a", "--arch", metavar="ARCH", default=None,
                       help="model architecture (default: resnet18 with --data, mobilenet_v2 embedded)")
        p.add_argument("--teacher-arch", default="resnet101", help="teacher for distillation (--data runs)")
        p.add_argument("-nc", "--num-classes", type=int, default=None, help="classes (default 1000; embedded 10)")
        p.add_argument("--image-size", type=int, default=None, help="input resolution (224; embedded 64)")
        p.add_argument("--on-bad-image", default="error", choices=["error", "skip"],
                       help="an unreadable --data image (corrupt, truncated): stop with an error naming the file, or "
                            "skip it (the next readable image takes its place), counted and reported per epoch and "
                            "in the metrics JSON (skipped_images)")

    def recipe(self, flags) -> dict:
        if not flags.embedded:
            return {**GENERAL, **(GENERAL_FLOAT if flags.not_qat else {})}
        low_bit = flags.backend == "Experimental" and min(flags.w_bit or 8, flags.a_bit or 8) < 8 and not flags.smoke
        return {**EMBEDDED, **(EMBEDDED_LOW_BIT if low_bit else {}),
                **(EMBEDDED_LOW_BIT_FROM_PTQ if low_bit and flags.ptq_recon else {})}

    def check(self, flags) -> dict:
        if flags.embedded and flags.num_classes != 10:
            raise SuiteError(f"the embedded Fashion-MNIST default has 10 classes, -nc/--num-classes is "
                             f"{flags.num_classes}")
        if flags.image_size < 32:
            raise SuiteError(f"--image-size {flags.image_size} must be >= 32 (the zoo networks downsample by 32)")
        if flags.num_classes < 1:
            raise SuiteError(f"-nc/--num-classes {flags.num_classes} must be >= 1")
        check_arch(flags.arch, flags.model_zoo)
        if flags.distill_method and not flags.embedded and not flags.teacher_path:
            check_arch(flags.teacher_arch, flags.model_zoo, "--teacher-arch")
        distilled = flags.distill_method and not (flags.not_qat or flags.evaluate or flags.teacher_path)
        return {"teacher": teacher_source(flags) if distilled else "float"}

    # ---- data and model
    def datasets(self, cfg) -> Data:
        """Train, calibration (training images, no augmentation) and validation sets."""
        from suites.common.assets import load_fashion_mnist
        from suites.imagenet import data
        if cfg.embedded:
            fm = load_fashion_mnist()
            (xtr, ytr), (xte, yte) = fm["train"], fm["test"]
            train = data.FashionMNISTImageNet(xtr, ytr, cfg.image_size, train=True)
            calib = data.FashionMNISTImageNet(xtr, ytr, cfg.image_size, train=False)
            val = data.FashionMNISTImageNet(xte, yte, cfg.image_size, train=False)
        else:
            data.check_imagefolder(cfg.data)
            n = len(data.class_folders(os.path.join(cfg.data, "train")))  # before ImageFolder scans every image
            if n != cfg.num_classes:
                more = (f"the model's {cfg.num_classes - n} extra outputs would never see a label"
                        if n < cfg.num_classes else "the labels would not fit the model's outputs")
                raise SuiteError(f"--data '{cfg.data}' has {n} classes (class folders in train/) but "
                                 f"-nc/--num-classes is {cfg.num_classes}: {more}; use -nc {n}")
            train, val, calib = data.imagefolder_datasets(cfg.data, cfg.image_size, cfg.on_bad_image)
        val = val_subset(val, cfg.val_images, cfg.seed)
        return Data(train, calib, val, name="fashion-mnist" if cfg.embedded else cfg.data,
                    example=image_example(cfg.image_size),
                    facts={"num_classes": cfg.num_classes, "image_size": cfg.image_size},
                    checkpoint={"num_classes": cfg.num_classes}, cache_key={"image_size": cfg.image_size})

    def build_model(self, cfg, arch: str, pretrained: bool) -> nn.Module:
        return create_model(arch, cfg.model_zoo, cfg.num_classes, pretrained)

    # ---- metric
    def evaluate(self, model, loader, run, prefix: str) -> dict:
        from suites.common.training import autocast, input_format
        model.eval()
        fmt = input_format(model)

        def predict(images):
            with autocast(run):
                return model(images.contiguous(memory_format=fmt)).float()

        return topk_scores(loader, predict, run.config.print_freq, prefix, device=run.device, with_loss=True)

    def evaluate_onnx(self, session, loader, run, prefix: str) -> dict:
        from ts_qat_pytorch.onnx.verify import run_in_batches
        batch = run.config.onnx_batch

        def predict(images):  # batches are cut / zero-padded to the file's batch
            return torch.from_numpy(run_in_batches(session, images.numpy().astype(np.float32), batch)[0])

        return topk_scores(loader, predict, run.config.print_freq, prefix)


def image_example(size: int) -> torch.Tensor:
    """The export's example input: one seeded random image."""
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def teacher_source(flags) -> str:
    """The float model teaches the embedded default. With --data the zoo's pretrained --teacher-arch does, unless
    its head predicts another number of classes than -nc (a new head would be random): then the fine-tuned float
    model of --model-path teaches (logged), and without one it is an error."""
    if flags.embedded:
        return "float"
    zoo_nc = zoo_num_classes(flags.teacher_arch, flags.model_zoo)
    if zoo_nc is None or zoo_nc == flags.num_classes:
        return "zoo"
    if flags.model_path:
        logger.warning("distillation teacher: the float model of --model-path '%s' (%d classes), not "
                       "--teacher-arch %s: the zoo's pretrained %s predicts %d classes and a new %d-class head "
                       "would be random; give --teacher-path for another teacher", flags.model_path,
                       flags.num_classes, flags.teacher_arch, flags.teacher_arch, zoo_nc, flags.num_classes)
        return "float"
    raise SuiteError(f"--distill-method {flags.distill_method} with -nc/--num-classes {flags.num_classes}: the "
                     f"pretrained --teacher-arch {flags.teacher_arch} predicts {zoo_nc} classes, and a new "
                     f"{flags.num_classes}-class head would be random; give --teacher-path (a {flags.num_classes}-"
                     f"class teacher), --model-path (fine-tuned float weights, which then teach), or "
                     "--distill-method none")


@torch.no_grad()
def topk_scores(loader, predict, print_freq: int, prefix: str, device=None, with_loss: bool = False) -> dict:
    """Top-1 / top-5 (%) of ``predict(images) -> logits`` over a loader, with the manual's progress lines."""
    import time

    from suites.common.meters import AverageMeter, ProgressMeter, Summary, accuracy
    from suites.common.training import report_skips, skipped_images
    batch_time = AverageMeter("Time", ":6.3f", Summary.NONE)
    losses = AverageMeter("Loss", ":.4e", Summary.NONE)
    top1 = AverageMeter("Acc@1", ":6.2f", Summary.AVERAGE)
    top5 = AverageMeter("Acc@5", ":6.2f", Summary.AVERAGE)
    meters = [batch_time] + ([losses] if with_loss else []) + [top1, top5]
    progress = ProgressMeter(len(loader), meters, prefix=f"{prefix}: ", print_freq=print_freq * 5)
    skipped_before = skipped_images(loader.dataset)
    end = time.time()
    try:
        for i, (images, target) in enumerate(loader):
            if device is not None:
                images, target = images.to(device), target.to(device)
            output = predict(images)
            if with_loss:
                losses.update(F.cross_entropy(output, target).item(), images.size(0))
            acc1, acc5 = accuracy(output, target, topk=(1, 5))
            top1.update(acc1[0], images.size(0))
            top5.update(acc5[0], images.size(0))
            batch_time.update(time.time() - end)
            end = time.time()
            progress.step(i)
    finally:
        progress.close()
    progress.display_summary()
    report_skips(loader.dataset, skipped_before, prefix)
    return {"top1": round(top1.avg, 3), "top5": round(top5.avg, 3)}


# ---- the model zoo
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


def zoo_num_classes(arch: str, zoo: str) -> int | None:
    """Classes the zoo's pretrained weights of ``arch`` predict (1000 for ImageNet-1k), None when unknown.
    Reads the weights' metadata only: nothing is downloaded or built."""
    try:
        if zoo == "timm":
            import timm
            cfg = timm.models.get_pretrained_cfg(arch)
            return int(cfg.num_classes) if cfg is not None and cfg.num_classes else None
        import torchvision.models as models
        return len(models.get_model_weights(arch).DEFAULT.meta["categories"])
    except Exception:  # noqa: BLE001 - unknown arch / no pretrained weights: the later checks speak
        return None


SUITE = ImageNetSuite()
