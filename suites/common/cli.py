"""The runner's command line: the flags every suite shares (pytorch/examples' names), the suite's own flags, the
recipe (embedded without --data, general with it), range checks before any work, and logging.

Flags whose default depends on the recipe default to None here; ``resolve`` fills them from ``suite.recipe(args)``,
then ``RUNNER_DEFAULTS``. The help text shows both recipes' values.
"""
from __future__ import annotations

import argparse
import logging
import math
import os

from suites.common.suite import Suite, SuiteError

OPSET_RANGE = (13, 21)  # what convert_export accepts (per-channel QDQ needs opset 13)
BACKENDS = ("TSQAT", "Experimental", "ONNXRuntime")

# defaults of recipe-dependent flags that no recipe sets
RUNNER_DEFAULTS = dict(
    epochs=1, batch_size=32, lr=1e-4, optim="adam", weight_decay=0.0, workers=0, print_freq=100, calib_batches=32,
    train_images=None, val_images=None, val_batch_size=None, float_epochs=0, float_images=None, float_lr=1e-3,
    backend="TSQAT", distill_method=None, distill_alpha=0.95, temperature=6.0, freeze_bn_epoch=None,
    clip_grad_norm=None,
)


def build_parser(suite: Suite) -> argparse.ArgumentParser:
    rec = _recipes(suite)

    def d(key: str) -> str:
        emb, gen = rec["embedded"].get(key), rec["general"].get(key)
        if emb is None and gen is None:
            return ""
        return f" ({gen}; embedded {emb})" if emb != gen else f" ({gen})"

    p = argparse.ArgumentParser(description=f"ts_qat_pytorch {suite.name} suite: float -> calibration -> QAT "
                                "(distillation) -> int8 ONNX -> onnxruntime",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--data", metavar="DIR", default=None, help="your data; absent: the suite's embedded default")
    g.add_argument("-j", "--workers", type=int, default=None, metavar="N", help="data loading workers" + d("workers"))
    g.add_argument("--pretrained", action="store_true", help="start from the zoo's pre-trained weights")
    g.add_argument("--model-path", default="", help="float weights (state_dict) to start from")
    g.add_argument("--train-images", type=int, default=None,
                   help="QAT on a random subset of this many training images per epoch" + d("train_images"))
    g.add_argument("--val-images", type=int, default=None, help="evaluate on the first N validation images")
    g.add_argument("--val-batch-size", type=int, default=None, help="evaluation batch (at least the training batch)")
    suite.add_arguments(g)

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None, metavar="N", help="QAT epochs" + d("epochs"))
    g.add_argument("--start-epoch", type=int, default=0, metavar="N", help="manual epoch number (on restarts)")
    g.add_argument("-b", "--batch-size", type=int, default=None, metavar="N",
                   help="total mini-batch size over all processes" + d("batch_size"))
    g.add_argument("--lr", "--learning-rate", type=float, default=None, dest="lr",
                   help="initial learning rate" + d("lr"))
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--wd", "--weight-decay", type=float, default=None, dest="weight_decay",
                   help="weight decay" + d("weight_decay"))
    g.add_argument("--optim", default=None, choices=["sgd", "adam", "adamw"],
                   help="optimizer (adam means AdamW)" + d("optim"))
    g.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradient norm" + d("clip_grad_norm"))
    g.add_argument("--amp", action="store_true", help="automatic mixed precision (bf16 on CPU, fp16 on CUDA)")
    g.add_argument("--freeze-bn-epoch", type=int, default=None,
                   help="freeze BN statistics from this epoch (-1: never)" + d("freeze_bn_epoch"))
    g.add_argument("--stop-after-epochs", type=int, default=None,
                   help="leave after this many epochs of this run (time-sliced jobs); --resume continues")
    g.add_argument("--seed", type=int, default=None, help="seed (embedded default: 0)")
    g.add_argument("--float-epochs", type=int, default=None, help="embedded float fine-tune epochs" + d("float_epochs"))
    g.add_argument("--float-images", type=int, default=None,
                   help="embedded float fine-tune images per epoch" + d("float_images"))
    g.add_argument("--float-lr", type=float, default=None, help="embedded float fine-tune peak lr (AdamW one-cycle)"
                   + d("float_lr"))
    g.add_argument("--not-qat", action="store_true", help="float training / evaluation, no quantization")

    g = p.add_argument_group("quantization and distillation")
    g.add_argument("--backend", default=None, choices=BACKENDS, help="quantization backend" + d("backend"))
    g.add_argument("--w-bit", type=int, default=None, help="weight bits (Experimental backend)")
    g.add_argument("--a-bit", type=int, default=None, help="activation bits (Experimental backend)")
    g.add_argument("--first-last-bit", type=int, default=None,
                   help="bits of the first and the last layer (weights, inputs, output) when --w-bit/--a-bit are "
                        "lower (default 8; 0: quantize them like the rest)")
    g.add_argument("--calib-batches", type=int, default=None, help="calibration batches" + d("calib_batches"))
    g.add_argument("--distill-method", default=None, choices=["kd", "none"],
                   help="distillation (kd = KL of softened logits * T^2)" + d("distill_method"))
    g.add_argument("--distill-alpha", type=float, default=None, help="loss = alpha*KD + (1-alpha)*CE"
                   + (d("distill_alpha") or f" ({RUNNER_DEFAULTS['distill_alpha']})"))
    g.add_argument("--temperature", type=float, default=None,
                   help="kd temperature" + (d("temperature") or f" ({RUNNER_DEFAULTS['temperature']})"))
    g.add_argument("--teacher-path", default="", help="teacher weights (state_dict); default teacher: the float model")

    g = p.add_argument_group("outputs")
    g.add_argument("--resume", default="", metavar="PATH", help="QAT checkpoint to resume (epoch, optimizer, "
                   "LR schedule, fake-quant state, RNG)")
    g.add_argument("-e", "--evaluate", action="store_true", help="evaluate (and export) only")
    g.add_argument("--output-dir", default="checkpoint",
                   help=f"outputs go to <output-dir>/{suite.name}/ (checkpoints, ONNX, qparams, metrics, profile)")
    g.add_argument("--metrics", default=None, help=f"metrics JSON (default <output-dir>/{suite.name}/<arch>_metrics.json)")
    g.add_argument("--baselines", default=None,
                   help="compare the metrics with this baselines.json at the end; exit 1 on failure")
    g.add_argument("--cache-dir", default=None, help=f"float fine-tune cache (default $TS_QAT_CACHE/{suite.name})")
    g.add_argument("--onnx-batch", type=int, default=1, help="batch size baked into the exported ONNX")
    g.add_argument("--opset-version", type=int, default=18, help="ONNX opset of the export (13..21)")
    g.add_argument("--no-export", action="store_true", help="no ONNX export (checkpoints only)")
    g.add_argument("--no-ort-eval", action="store_true", help="skip the onnxruntime evaluation")
    g.add_argument("--profile", action="store_true",
                   help="per-layer float vs fake-quant comparison (table, <arch>_profile.csv and .png)")
    g.add_argument("--sensitivity", action="store_true",
                   help="one layer at a time left float, the metric on the validation set: ranking, "
                        "<arch>_sensitivity.json / .png and <arch>_exclude.json (prepare_by_platform's exclusions)")
    g.add_argument("-p", "--print-freq", type=int, default=None, help="log every N batches" + d("print_freq"))
    g.add_argument("-l", "--log-level", type=int, default=1, choices=[0, 1, 2, 3],
                   help="0 debug, 1 info, 2 warning, 3 error")
    g.add_argument("--smoke", action="store_true", help="tiny run of the whole pipeline (a few steps) for tests")

    g = p.add_argument_group("devices and processes")
    g.add_argument("--device", default=None,
                   help="cpu, a GPU index (0), GPU indices (0,1: one process each, DistributedDataParallel), cuda "
                        "(every visible GPU) or cuda:N; default: every visible GPU, else the CPU")
    g.add_argument("--gpu", type=int, default=None, help="GPU id to use (the manual's flag; = --device N)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; $TS_QAT_THREADS)")
    g.add_argument("--world-size", type=int, default=-1, help="number of nodes (or processes under torchrun)")
    g.add_argument("--rank", type=int, default=-1, help="node rank")
    g.add_argument("--dist-url", default="env://", help="url used to set up distributed training")
    g.add_argument("--dist-backend", default="nccl", help="distributed backend (gloo is used on CPU)")
    g.add_argument("--multiprocessing-distributed", action="store_true",
                   help="launch N processes per node (N = the devices' GPUs, or 2 on CPU) with DistributedDataParallel")
    return p


def _recipes(suite: Suite) -> dict:
    r = getattr(suite, "recipes", None) or {}
    return {"embedded": r.get("embedded", {}), "general": r.get("general", {})}


def resolve(suite: Suite, args: argparse.Namespace) -> argparse.Namespace:
    """Fill the recipe, apply --smoke, check ranges; SuiteError for a flag that would fail late or train nonsense."""
    args.embedded = args.data is None
    args.lr_given = args.lr is not None  # an explicit --lr (a --resume with another one is reported)
    given = {k for k, v in vars(args).items() if v is not None}
    recipe = {**RUNNER_DEFAULTS, **suite.recipe(args)}
    for k, v in recipe.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.smoke:
        for k, v in suite.smoke(args).items():
            if k not in given:
                setattr(args, k, v)
    if args.freeze_bn_epoch is not None and args.freeze_bn_epoch < 0:
        args.freeze_bn_epoch = None
    if args.distill_method == "none":
        args.distill_method = None
    if args.seed is None and args.embedded:
        args.seed = 0
    args.arch = suite.arch(args)
    args.out_dir = os.path.join(args.output_dir, suite.name)
    if args.metrics is None:
        args.metrics = os.path.join(args.out_dir, f"{args.arch}_metrics.json")
    if args.backend != "Experimental" and (args.w_bit or args.a_bit) and (args.w_bit, args.a_bit) != (8, 8):
        raise SuiteError(f"--w-bit/--a-bit need --backend Experimental ({args.backend} has fixed bit widths)")
    if args.onnx_batch < 1 or args.batch_size < 1:
        raise SuiteError("--onnx-batch and --batch-size must be >= 1")
    check_ranges(suite, args)
    return args


def check_ranges(suite: Suite, args: argparse.Namespace) -> None:
    """Numbers that would fail late (the opset at the first export, after an epoch) or silently train nonsense
    (a negative or NaN learning rate): errors before any work."""
    for flag, v in (("--lr", args.lr), ("--float-lr", args.float_lr)):
        if not (math.isfinite(v) and v > 0):
            raise SuiteError(f"{flag} {v} must be a finite number > 0 (e.g. --lr 1e-4)")
    if args.workers < 0:
        raise SuiteError(f"-j/--workers {args.workers} must be >= 0 (0: load data in the main process)")
    suite.check_args(args)
    lo, hi = OPSET_RANGE
    if not lo <= args.opset_version <= hi:
        raise SuiteError(f"--opset-version {args.opset_version} is outside {lo}..{hi} (what convert_export writes; "
                         f"per-channel QDQ needs opset 13); the default is 18")


def set_log_level(level: int, *names: str) -> None:
    lvl = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR][level]
    logging.basicConfig(level=lvl, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for name in ("ts_qat_pytorch", "suites", *names):
        logging.getLogger(name).setLevel(lvl)
    if level >= 1:
        for noisy in ("torch.onnx", "onnxscript", "onnx_ir", "torch._dynamo", "torch.export", "torch.fx"):
            logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))


def threads(args) -> int:
    """--threads, else $TS_QAT_THREADS, else 0 (torch's choice)."""
    return args.threads or int(os.environ.get("TS_QAT_THREADS", "0") or 0)
