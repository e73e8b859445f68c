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
    errors = (DataError,)
    recipes = {"embedded": EMBEDDED, "general": GENERAL}
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

    def recipe(self, args) -> dict:
        if not args.embedded:
            return {**GENERAL, **(GENERAL_FLOAT if args.not_qat else {})}
        low_bit = args.backend == "Experimental" and min(args.w_bit or 8, args.a_bit or 8) < 8 and not args.smoke
        return {**EMBEDDED, **(EMBEDDED_LOW_BIT if low_bit else {}),
                **(EMBEDDED_LOW_BIT_FROM_PTQ if low_bit and args.ptq_recon else {})}

    def smoke(self, args) -> dict:
        return dict(SMOKE)

    def check_args(self, args) -> None:
        if args.embedded and args.num_classes != 10:
            raise SuiteError(f"the embedded Fashion-MNIST default has 10 classes, -nc/--num-classes is "
                             f"{args.num_classes}")
        if args.image_size < 32:
            raise SuiteError(f"--image-size {args.image_size} must be >= 32 (the zoo networks downsample by 32)")
        if args.num_classes < 1:
            raise SuiteError(f"-nc/--num-classes {args.num_classes} must be >= 1")

    def arch(self, args) -> str:
        return args.arch

    # ---- checks, data
    def check(self, args) -> None:
        check_arch(args.arch, args.model_zoo)
        if args.distill_method and not args.embedded and not args.teacher_path:
            check_arch(args.teacher_arch, args.model_zoo, "--teacher-arch")

    def datasets(self, args) -> Data:
        """Train, calibration (training images, no augmentation) and validation sets."""
        from suites.common.assets import load_fashion_mnist
        from suites.imagenet import data
        if args.embedded:
            fm = load_fashion_mnist()
            (xtr, ytr), (xte, yte) = fm["train"], fm["test"]
            train = data.FashionMNISTImageNet(xtr, ytr, args.image_size, train=True)
            calib = data.FashionMNISTImageNet(xtr, ytr, args.image_size, train=False)
            val = data.FashionMNISTImageNet(xte, yte, args.image_size, train=False)
        else:
            data.check_imagefolder(args.data)
            n = len(data.class_folders(os.path.join(args.data, "train")))  # before ImageFolder scans every image
            if n != args.num_classes:
                more = (f"the model's {args.num_classes - n} extra outputs would never see a label"
                        if n < args.num_classes else "the labels would not fit the model's outputs")
                raise SuiteError(f"--data '{args.data}' has {n} classes (class folders in train/) but "
                                 f"-nc/--num-classes is {args.num_classes}: {more}; use -nc {n}")
            train, val, calib = data.imagefolder_datasets(args.data, args.image_size, args.on_bad_image)
        val = val_subset(val, args.val_images, args.seed)
        return Data(train, calib, val, name="fashion-mnist" if args.embedded else args.data)

    def extras(self, args, data: Data) -> dict:
        return {"num_classes": args.num_classes, "image_size": args.image_size}

    def cache_key(self, args) -> dict:
        return {"image_size": args.image_size}

    def checkpoint_extras(self, args) -> dict:
        return {"num_classes": args.num_classes}

    # ---- models and teacher
    def build_model(self, args, arch: str, pretrained: bool) -> nn.Module:
        return create_model(arch, args.model_zoo, args.num_classes, pretrained)

    def teacher_source(self, args) -> str:
        """The float model teaches the embedded default. With --data the zoo's pretrained --teacher-arch does, unless
        its head predicts another number of classes than -nc (a new head would be random): then the fine-tuned float
        model of --model-path teaches (logged), and without one it is an error."""
        if args.embedded:
            return "float"
        zoo_nc = zoo_num_classes(args.teacher_arch, args.model_zoo)
        if zoo_nc is None or zoo_nc == args.num_classes:
            return "zoo"
        if args.model_path:
            logger.warning("distillation teacher: the float model of --model-path '%s' (%d classes), not "
                           "--teacher-arch %s: the zoo's pretrained %s predicts %d classes and a new %d-class head "
                           "would be random; give --teacher-path for another teacher", args.model_path,
                           args.num_classes, args.teacher_arch, args.teacher_arch, zoo_nc, args.num_classes)
            return "float"
        raise SuiteError(f"--distill-method {args.distill_method} with -nc/--num-classes {args.num_classes}: the "
                         f"pretrained --teacher-arch {args.teacher_arch} predicts {zoo_nc} classes, and a new "
                         f"{args.num_classes}-class head would be random; give --teacher-path (a {args.num_classes}-"
                         f"class teacher), --model-path (fine-tuned float weights, which then teach), or "
                         "--distill-method none")

    def teacher_arch(self, args) -> str:
        return args.teacher_arch

    # ---- metric
    def dummy_input(self, args):
        return torch.randn(1, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))

    def describe(self, scores: dict) -> str:
        return f"top-1 {scores['top1']:.3f} top-5 {scores['top5']:.3f}"

    def evaluate(self, model, loader, args, prefix: str) -> dict:
        from suites.common.training import autocast, input_format
        model.eval()
        fmt = input_format(model)

        def predict(images):
            with autocast(args):
                return model(images.contiguous(memory_format=fmt)).float()

        return topk_scores(loader, predict, args, prefix, device=args.device, with_loss=True)

    def evaluate_onnx(self, session, loader, args, prefix: str) -> dict:
        from ts_qat_pytorch.onnx.verify import run_in_batches

        def predict(images):  # batches are cut / zero-padded to the file's batch
            return torch.from_numpy(run_in_batches(session, images.numpy().astype(np.float32), args.onnx_batch)[0])

        return topk_scores(loader, predict, args, prefix)


@torch.no_grad()
def topk_scores(loader, predict, args, prefix: str, device=None, with_loss: bool = False) -> dict:
    """Top-1 / top-5 (%) of ``predict(images) -> logits`` over a loader, with the manual's progress lines."""
    import time

    from suites.common.meters import AverageMeter, ProgressMeter, Summary, accuracy
    from suites.common.training import report_skips, skipped_images
    batch_time = AverageMeter("Time", ":6.3f", Summary.NONE)
    losses = AverageMeter("Loss", ":.4e", Summary.NONE)
    top1 = AverageMeter("Acc@1", ":6.2f", Summary.AVERAGE)
    top5 = AverageMeter("Acc@5", ":6.2f", Summary.AVERAGE)
    meters = [batch_time] + ([losses] if with_loss else []) + [top1, top5]
    progress = ProgressMeter(len(loader), meters, prefix=f"{prefix}: ", print_freq=args.print_freq * 5)
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
