"""The segmentation suite: its models (LR-ASPP on mobilenet_v2 with real ImageNet weights, or torchvision's
segmentation models; model.py), its data (synthetic Fashion-MNIST scenes with masks, or images + masks; data.py),
its metric (mIoU and pixel accuracy, in PyTorch and onnxruntime; metric.py) and its recipes. The pipeline is the
runner's (suites/common/runner.py)."""
from __future__ import annotations

import difflib
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data

from suites.common.subsets import val_subset
from suites.common.suite import Data, Metric, Suite, SuiteError
from suites.segmentation import data as D
from suites.segmentation.metric import IGNORE, ConfusionMatrix, plot_iou, upsampled
from suites.segmentation.model import LRASPP_ARCHS, create_model, torchvision_archs


EMBEDDED = dict(
    arch="lraspp_mobilenet_v2_s4", num_classes=11, image_size=64, scenes=(12000, 500), scene_items=4,
    backend="TSQAT",
    # float fine-tune of the ImageNet backbone with the new head (cached, reused when valid): 6 x 12 000 scenes
    float_epochs=6, float_images=12000, float_lr=3e-3,
    # QAT: a short touch-up, distilled per pixel from the float model (distill_loss)
    epochs=1, batch_size=32, lr=5e-5, optim="adam", weight_decay=0.0, train_images=1600, freeze_bn_epoch=0,
    calib_batches=16, print_freq=50, workers=0, distill_method="kd", val_batch_size=100,
)

GENERAL = dict(
    arch="lraspp_mobilenet_v2", num_classes=21, image_size=512, scenes=(12000, 500), scene_items=4,
    backend="TSQAT",
    float_epochs=6, float_images=12000, float_lr=3e-3,  # the embedded fine-tune's (unused with --data)
    epochs=10, batch_size=16, lr=1e-4, optim="adam", weight_decay=0.0, train_images=None,
    calib_batches=32, print_freq=50, workers=4, distill_method=None,
)

SMOKE = dict(scenes=(96, 32), float_images=96, float_epochs=1, train_images=32, calib_batches=1, batch_size=16,
             image_size=64, print_freq=2)


class SegmentationSuite(Suite):
    name = "segmentation"
    metric = Metric("miou", "higher", ".2f")
    recipes = {"embedded": EMBEDDED, "general": GENERAL}
    train_meters = (("PixAcc", ":6.2f"),)
    cache_tag = "scenes"

    def __init__(self):
        self.per_class: dict = {}  # stage -> {"miou", "iou"}: the metrics' extras, filled by each evaluation

    # ---- command line and recipe
    def add_arguments(self, p) -> None:
        p.add_argument("-a", "--arch", metavar="ARCH", default=None,
                       help=f"{', '.join(LRASPP_ARCHS)} (ImageNet backbone) or a torchvision segmentation model "
                            "(lraspp_mobilenet_v3_large, deeplabv3_mobilenet_v3_large, fcn_resnet50, ...)")
        p.add_argument("--weights", metavar="FILE", default="",
                       help="start from this state_dict of --arch (torch.load(weights_only=True)) instead of the "
                            "ImageNet backbone; e.g. torchvision's COCO-VOC weights saved by you")
        p.add_argument("-nc", "--num-classes", type=int, default=None,
                       help="classes including background (21; embedded 11)")
        p.add_argument("--image-size", type=int, default=None,
                       help="input resolution, square, a multiple of 16 (512; embedded 64)")
        p.add_argument("--scenes", type=int, nargs=2, default=None, metavar=("TRAIN", "VAL"),
                       help="embedded default: number of synthetic train / val scenes (12000 500)")
        p.add_argument("--scene-items", type=int, default=None, help="embedded default: at most this many items "
                       "per scene (4, as yolov5's scenes)")

    def smoke(self, args) -> dict:
        return dict(SMOKE)

    def check_args(self, args) -> None:
        if args.embedded and args.num_classes != len(D.SCENE_CLASSES):
            raise SuiteError(f"the embedded scenes have {len(D.SCENE_CLASSES)} classes (background + 10 "
                             f"Fashion-MNIST classes), -nc/--num-classes is {args.num_classes}")
        if args.num_classes < 2:
            raise SuiteError(f"-nc/--num-classes {args.num_classes} must be >= 2 (background and a class)")
        if args.image_size < 32 or args.image_size % 16:
            raise SuiteError(f"--image-size {args.image_size} must be a multiple of 16, >= 32 (the LR-ASPP head "
                             "joins stride-16 and stride-8 features)")
        if min(args.scenes) < 1:
            raise SuiteError(f"--scenes {args.scenes[0]} {args.scenes[1]} must both be >= 1")

    def arch(self, args) -> str:
        return args.arch

    # ---- checks, data
    def check(self, args) -> None:
        names = list(LRASPP_ARCHS) + torchvision_archs()
        if args.arch not in names:
            close = difflib.get_close_matches(args.arch, names, n=4, cutoff=0.5)
            raise SuiteError(f"unknown --arch '{args.arch}'; " + (f"did you mean {', '.join(close)}?" if close else
                             f"choose one of {', '.join(names)}"))
        if args.weights and args.model_path:
            raise SuiteError("--weights and --model-path both give the float weights: give one (--model-path: a "
                             "trained model, no embedded fine-tune; --weights: a start for it)")
        if args.weights:
            from suites.common.checkpoints import read_state_dict
            read_state_dict(args.weights, "--weights")  # readable, a state_dict

    def datasets(self, args) -> Data:
        if args.embedded:
            train, calib, val = D.embedded_datasets(*args.scenes, args.image_size, seed=0, max_items=args.scene_items)
        else:
            train, calib, val = D.user_datasets(args.data, args.num_classes, args.image_size)
        val = val_subset(val, args.val_images, args.seed)
        return Data(train, calib, val, name="synthetic Fashion-MNIST scenes" if args.embedded else args.data)

    def extras(self, args, data: Data) -> dict:
        self.per_class.clear()
        classes = list(D.SCENE_CLASSES) if args.embedded else [str(c) for c in range(args.num_classes)]
        self.classes = classes
        self.chart = os.path.join(os.path.dirname(os.path.abspath(args.metrics)), f"{args.arch}_iou.png")
        # the dict is filled by the evaluations later (the runner has no hook after the run: see README.md)
        return {"num_classes": args.num_classes, "image_size": args.image_size, "classes": classes,
                "scenes": list(args.scenes) if args.embedded else None, "per_class_iou": self.per_class,
                "iou_chart": self.chart}

    def cache_key(self, args) -> dict:
        return {"image_size": args.image_size, "scenes": list(args.scenes), "scene_items": args.scene_items,
                "scenes_version": D.SCENES_VERSION,
                "weights": args.weights or None}

    def checkpoint_extras(self, args) -> dict:
        return {"num_classes": args.num_classes}

    # ---- models
    def build_model(self, args, arch: str, pretrained: bool) -> nn.Module:
        try:
            model = create_model(arch, args.num_classes, pretrained and not args.weights)
        except (OSError, RuntimeError) as exc:  # torchvision's weights API without the internet
            raise SuiteError(f"the pretrained weights of {arch} could not be loaded ({exc}); give --weights FILE (a "
                             "state_dict) or leave out --pretrained") from exc
        if args.weights:
            from suites.common.checkpoints import check_shapes, read_state_dict
            sd = read_state_dict(args.weights, "--weights")
            check_shapes(model, sd, args.weights, args, "--weights")
            model.load_state_dict(sd, strict=False)
        return model

    def embedded_weights(self, args) -> bool:
        """ImageNet weights exist offline for mobilenet_v2 only; torchvision's models start random (or --weights)."""
        return args.arch in LRASPP_ARCHS or bool(args.weights)

    # ---- batches, loss, metric
    def loss(self, output, target) -> torch.Tensor:
        """Per-pixel cross entropy at the mask's resolution (255 ignored); torchvision's aux head weighs 0.5."""
        loss = F.cross_entropy(upsampled(output["out"].float(), target.shape[-2:]), target, ignore_index=IGNORE)
        if "aux" in output:
            loss = loss + 0.5 * F.cross_entropy(upsampled(output["aux"].float(), target.shape[-2:]), target,
                                                ignore_index=IGNORE)
        return loss

    def distill_loss(self, output, teacher_output, target, args) -> torch.Tensor:
        """Per-pixel distillation: ``alpha * KL(teacher || student) * T^2`` over the classes at every labelled pixel
        of the logit grid (ignored pixels left out), ``+ (1 - alpha) *`` the per-pixel cross entropy."""
        t = args.temperature
        s_out, t_out = output["out"].float(), teacher_output["out"].float()
        kl = F.kl_div(F.log_softmax(s_out / t, dim=1), F.softmax(t_out / t, dim=1), reduction="none").sum(1)
        valid = F.interpolate((target != IGNORE).float()[:, None], size=kl.shape[-2:], mode="area")[:, 0] > 0
        kd = (kl * valid).sum() / valid.sum().clamp(min=1) * (t * t)
        if args.distill_alpha >= 1.0:
            return kd
        return args.distill_alpha * kd + (1.0 - args.distill_alpha) * self.loss(output, target)

    def train_scores(self, output, target) -> tuple[float, ...]:
        with torch.no_grad():
            pred = upsampled(output["out"].float(), target.shape[-2:]).argmax(1)
            keep = target != IGNORE
            return (100.0 * float((pred[keep] == target[keep]).float().mean()) if keep.any() else 0.0,)

    def dummy_input(self, args):
        return torch.randn(1, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))

    def describe(self, scores: dict) -> str:
        return f"mIoU {scores['miou']:.2f} pixel acc {scores['pixel_acc']:.2f}"

    def evaluate(self, model, loader, args, prefix: str) -> dict:
        from suites.common.training import autocast, input_format
        model.eval()
        fmt = input_format(model)

        def predict(images):
            with autocast(args):
                return model(images.to(args.device).contiguous(memory_format=fmt))["out"].float()

        return self.score(loader, predict, args, prefix)

    def evaluate_onnx(self, session, loader, args, prefix: str) -> dict:
        from ts_qat_pytorch.onnx.verify import run_in_batches
        names = [o.name for o in session.get_outputs()]
        i = names.index("out") if "out" in names else 0

        def predict(images):  # batches are cut / zero-padded to the file's batch
            return torch.from_numpy(run_in_batches(session, images.numpy().astype(np.float32), args.onnx_batch)[i])

        return self.score(loader, predict, args, prefix)

    @torch.no_grad()
    def score(self, loader, predict, args, prefix: str) -> dict:
        """mIoU / pixel accuracy of ``predict(images) -> logits`` over a loader; per-class IoU into the extras and
        the chart (float, QAT, ORT int8)."""
        import time

        from suites.common.meters import AverageMeter, ProgressMeter, Summary
        batch_time = AverageMeter("Time", ":6.3f", Summary.NONE)
        progress = ProgressMeter(len(loader), [batch_time], prefix=f"{prefix}: ", print_freq=args.print_freq * 5)
        cm = ConfusionMatrix(args.num_classes)
        end = time.time()
        try:
            for i, (images, target) in enumerate(loader):
                cm.update(target, upsampled(predict(images).cpu(), target.shape[-2:]).argmax(1))
                batch_time.update(time.time() - end)
                end = time.time()
                progress.step(i)
        finally:
            progress.close()
        s = cm.scores()
        stage = {"Float": "float", "QAT": "qat", "ORT int8": "ort"}.get(prefix)
        if stage:
            self.per_class[stage] = {"miou": s["miou"], "iou": s["iou"]}
            plot_iou(self.per_class, self.classes, self.chart, f"{args.arch} {args.backend}: per-class IoU")
        return {"miou": s["miou"], "pixel_acc": s["pixel_acc"]}


SUITE = SegmentationSuite()
