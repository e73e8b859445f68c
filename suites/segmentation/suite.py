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
    summary = "mIoU {miou:.2f} pixel acc {pixel_acc:.2f}"
    recipes = {"embedded": EMBEDDED, "general": GENERAL}
    smoke = SMOKE
    train_meters = (("PixAcc", ":6.2f"),)
    cache_tag = "scenes"

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

    def check(self, flags) -> dict:
        if flags.embedded and flags.num_classes != len(D.SCENE_CLASSES):
            raise SuiteError(f"the embedded scenes have {len(D.SCENE_CLASSES)} classes (background + 10 "
                             f"Fashion-MNIST classes), -nc/--num-classes is {flags.num_classes}")
        if flags.num_classes < 2:
            raise SuiteError(f"-nc/--num-classes {flags.num_classes} must be >= 2 (background and a class)")
        if flags.image_size < 32 or flags.image_size % 16:
            raise SuiteError(f"--image-size {flags.image_size} must be a multiple of 16, >= 32 (the LR-ASPP head "
                             "joins stride-16 and stride-8 features)")
        if min(flags.scenes) < 1:
            raise SuiteError(f"--scenes {flags.scenes[0]} {flags.scenes[1]} must both be >= 1")
        names = list(LRASPP_ARCHS) + torchvision_archs()
        if flags.arch not in names:
            close = difflib.get_close_matches(flags.arch, names, n=4, cutoff=0.5)
            raise SuiteError(f"unknown --arch '{flags.arch}'; " + (f"did you mean {', '.join(close)}?" if close else
                             f"choose one of {', '.join(names)}"))
        if flags.weights and flags.model_path:
            raise SuiteError("--weights and --model-path both give the float weights: give one (--model-path: a "
                             "trained model, no embedded fine-tune; --weights: a start for it)")
        if flags.weights:
            from suites.common.checkpoints import read_state_dict
            read_state_dict(flags.weights, "--weights")  # readable, a state_dict
        # ImageNet weights exist offline for mobilenet_v2 only; torchvision's models start random (or --weights)
        return {"embedded_weights": flags.arch in LRASPP_ARCHS or bool(flags.weights)}

    # ---- data and model
    def datasets(self, cfg) -> Data:
        if cfg.embedded:
            train, calib, val = D.embedded_datasets(*cfg.scenes, cfg.image_size, seed=0, max_items=cfg.scene_items)
        else:
            train, calib, val = D.user_datasets(cfg.data, cfg.num_classes, cfg.image_size)
        val = val_subset(val, cfg.val_images, cfg.seed)
        classes = list(D.SCENE_CLASSES) if cfg.embedded else [str(c) for c in range(cfg.num_classes)]
        chart = os.path.join(os.path.dirname(os.path.abspath(cfg.metrics)), f"{cfg.arch}_iou.png")
        facts = {"num_classes": cfg.num_classes, "image_size": cfg.image_size, "classes": classes,
                 "scenes": list(cfg.scenes) if cfg.embedded else None, "per_class_iou": {}, "iou_chart": chart}
        key = {"image_size": cfg.image_size, "scenes": list(cfg.scenes), "scene_items": cfg.scene_items,
               "scenes_version": D.SCENES_VERSION, "weights": cfg.weights or None}
        example = torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
        return Data(train, calib, val, name="synthetic Fashion-MNIST scenes" if cfg.embedded else cfg.data,
                    example=example, facts=facts, checkpoint={"num_classes": cfg.num_classes}, cache_key=key)

    def build_model(self, cfg, arch: str, pretrained: bool) -> nn.Module:
        try:
            model = create_model(arch, cfg.num_classes, pretrained and not cfg.weights)
        except (OSError, RuntimeError) as exc:  # torchvision's weights API without the internet
            raise SuiteError(f"the pretrained weights of {arch} could not be loaded ({exc}); give --weights FILE (a "
                             "state_dict) or leave out --pretrained") from exc
        if cfg.weights:
            from suites.common.checkpoints import check_shapes, read_state_dict
            sd = read_state_dict(cfg.weights, "--weights")
            check_shapes(model, sd, cfg.weights, "--weights", cfg.num_classes)
            model.load_state_dict(sd, strict=False)
        return model

    # ---- loss and metric
    def loss(self, output, target, teacher_output=None, cfg=None):
        """Per-pixel cross entropy at the mask's resolution (255 ignored; torchvision's aux head weighs 0.5), or
        per-pixel distillation: ``alpha * KL(teacher || student) * T^2`` over the classes at every labelled pixel of
        the logit grid (ignored pixels left out), ``+ (1 - alpha) *`` the cross entropy. The meter: pixel accuracy."""
        if teacher_output is None:
            loss = cross_entropy(output, target)
        else:
            loss = pixel_kd(output["out"].float(), teacher_output["out"].float(), target, cfg.temperature)
            if cfg.distill_alpha < 1.0:
                loss = cfg.distill_alpha * loss + (1.0 - cfg.distill_alpha) * cross_entropy(output, target)
        with torch.no_grad():
            pred = upsampled(output["out"].float(), target.shape[-2:]).argmax(1)
            keep = target != IGNORE
            acc = 100.0 * float((pred[keep] == target[keep]).float().mean()) if keep.any() else 0.0
        return loss, (acc,)

    def evaluate(self, model, loader, run, prefix: str) -> dict:
        from suites.common.training import autocast, input_format
        model.eval()
        fmt = input_format(model)

        def predict(images):
            with autocast(run):
                return model(images.to(run.device).contiguous(memory_format=fmt))["out"].float()

        return score(loader, predict, run, prefix)

    def evaluate_onnx(self, session, loader, run, prefix: str) -> dict:
        from ts_qat_pytorch.onnx.verify import run_in_batches
        names = [o.name for o in session.get_outputs()]
        i = names.index("out") if "out" in names else 0

        def predict(images):  # batches are cut / zero-padded to the file's batch
            return torch.from_numpy(run_in_batches(session, images.numpy().astype(np.float32),
                                                   run.config.onnx_batch)[i])

        return score(loader, predict, run, prefix)

    # ---- events
    def on_stage_end(self, run, stage: str, result) -> None:
        """Each float / QAT / ORT evaluation's per-class IoU into the metrics' extras, and the chart."""
        if stage in ("float_eval", "qat_eval", "ort_eval"):
            extras = run.metrics.extras
            extras["per_class_iou"][stage[:-5]] = result.detail
            plot_iou(extras["per_class_iou"], extras["classes"], extras["iou_chart"],
                     f"{run.config.arch} {run.backend}: per-class IoU")


def cross_entropy(output, target) -> torch.Tensor:
    """Per-pixel cross entropy at the mask's resolution (255 ignored); torchvision's aux head weighs 0.5."""
    loss = F.cross_entropy(upsampled(output["out"].float(), target.shape[-2:]), target, ignore_index=IGNORE)
    if "aux" in output:
        loss = loss + 0.5 * F.cross_entropy(upsampled(output["aux"].float(), target.shape[-2:]), target,
                                            ignore_index=IGNORE)
    return loss


def pixel_kd(s_out, t_out, target, t: float) -> torch.Tensor:
    """KL(teacher || student) * T^2 per pixel of the logit grid, averaged over the labelled pixels."""
    kl = F.kl_div(F.log_softmax(s_out / t, dim=1), F.softmax(t_out / t, dim=1), reduction="none").sum(1)
    valid = F.interpolate((target != IGNORE).float()[:, None], size=kl.shape[-2:], mode="area")[:, 0] > 0
    return (kl * valid).sum() / valid.sum().clamp(min=1) * (t * t)


@torch.no_grad()
def score(loader, predict, run, prefix: str) -> dict:
    """mIoU / pixel accuracy of ``predict(images) -> logits`` over a loader; the per-class IoU as the detail."""
    import time

    from suites.common.meters import AverageMeter, ProgressMeter, Summary
    batch_time = AverageMeter("Time", ":6.3f", Summary.NONE)
    progress = ProgressMeter(len(loader), [batch_time], prefix=f"{prefix}: ", print_freq=run.config.print_freq * 5)
    cm = ConfusionMatrix(run.config.num_classes)
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
    return {"miou": s["miou"], "pixel_acc": s["pixel_acc"], "detail": {"miou": s["miou"], "iou": s["iou"]}}


SUITE = SegmentationSuite()
