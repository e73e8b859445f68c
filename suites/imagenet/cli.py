"""Command line of the ImageNet suite: flags (the manual's), the two recipes, bad-input errors, logging."""
from __future__ import annotations

import argparse
import logging
import math


from suites.imagenet.data import DataError

logger = logging.getLogger("imagenet")


EMBEDDED_RECIPE = dict(
    arch="mobilenet_v2", num_classes=10, image_size=64,
    # float fine-tune of the ImageNet weights with the new head (cached, reused when valid)
    float_epochs=2, float_images=45000, float_lr=2e-3,
    # QAT
    epochs=1, batch_size=64, lr=5e-5, optim="adam", weight_decay=0.0, train_images=6400, freeze_bn_epoch=0,
    calib_batches=32, print_freq=20, workers=0, distill_method="kd",
)


# The embedded default below 8 bits (--backend Experimental --w-bit 4 --a-bit 4): 4-bit grids need longer QAT with a
# larger step than int8's touch-up (H200 sweep of the embedded W4A4, first/last layers 8-bit: 100 steps at 5e-5
# -9.0 points, 500 at 1e-4 -3.8, 500 at 5e-4 -2.6, 1000 at 5e-4 -2.3, 500 at 1e-3 diverges; 2-core CPU: 2000 steps
# at 5e-4, cosine to 0, -1.4).
EMBEDDED_LOW_BIT_RECIPE = dict(epochs=4, train_images=32000, lr=5e-4)


GENERAL_RECIPE = dict(
    arch="resnet18", num_classes=1000, image_size=224,
    epochs=90, batch_size=256, lr=0.1, optim="sgd", weight_decay=1e-4, train_images=None,
    calib_batches=32, print_freq=100, workers=4, distill_method=None,
)


OPSET_RANGE = (13, 21)  # what convert_export accepts (per-channel QDQ needs opset 13)


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
    p.add_argument("--first-last-bit", type=int, default=None,
                   help="bits of the first and the last layer (weights, inputs, output) when --w-bit/--a-bit are "
                        "lower (default 8; 0: quantize them like the rest)")
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
    p.add_argument("--opset-version", type=int, default=18, help="ONNX opset of the export (13..21)")
    p.add_argument("--on-bad-image", default="error", choices=["error", "skip"],
                   help="an unreadable --data image (corrupt, truncated): stop with an error naming the file, or "
                        "skip it (the next readable image takes its place), counted and reported per epoch and in "
                        "the metrics JSON (skipped_images)")
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


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    args.embedded = args.data is None
    args.lr_given = args.lr is not None  # an explicit --lr (a --resume with another one is reported)
    recipe = EMBEDDED_RECIPE if args.embedded else GENERAL_RECIPE
    if args.embedded and args.backend == "Experimental" and min(args.w_bit or 8, args.a_bit or 8) < 8 \
            and not args.smoke:
        recipe = {**recipe, **EMBEDDED_LOW_BIT_RECIPE}
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
    check_ranges(args)
    return args


def check_ranges(args: argparse.Namespace) -> None:
    """Numbers that would fail late (the opset at the first export, after an epoch) or silently train nonsense
    (a negative or NaN learning rate): errors before any work."""
    for flag, v in (("--lr", args.lr), ("--float-lr", args.float_lr)):
        if not (math.isfinite(v) and v > 0):
            raise SuiteError(f"{flag} {v} must be a finite number > 0 (e.g. --lr 1e-4)")
    if args.workers < 0:
        raise SuiteError(f"-j/--workers {args.workers} must be >= 0 (0: load data in the main process)")
    if args.image_size < 32:
        raise SuiteError(f"--image-size {args.image_size} must be >= 32 (the zoo networks downsample by 32)")
    lo, hi = OPSET_RANGE
    if not lo <= args.opset_version <= hi:
        raise SuiteError(f"--opset-version {args.opset_version} is outside {lo}..{hi} (what convert_export writes; "
                         f"per-channel QDQ needs opset 13); the default is 18")
    if args.num_classes < 1:
        raise SuiteError(f"-nc/--num-classes {args.num_classes} must be >= 1")


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
