"""The runner's command line: the flags every suite shares (pytorch/examples' names), the suite's own flags, the
recipe (embedded without --data, general with it), range checks before any work, and logging.

Flags whose default depends on the recipe default to None here; ``resolve`` fills them from ``suite.recipe(flags)``,
then ``RUNNER_DEFAULTS``, and freezes the result into the run's ``RunConfig`` (suites/common/run.py). The help text
shows both recipes' values, and each flag's default once.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os

from suites.common.run import RunConfig
from suites.common.suite import Suite, SuiteError

OPSET_RANGE = (13, 21)  # what convert_export accepts (per-channel QDQ needs opset 13)
BACKENDS = ("TSQAT", "Experimental", "ONNXRuntime")

# --ptq-recon's default: block-wise reconstruction (BRECQ) with QDrop (prob 0.5) and AdaRound's learned rounding.
# The QDrop paper fits 20 000 iterations per block with activation scales at lr 4e-5; on a 2-core CPU 500 iterations
# with the scales at 2e-3 took imagenet's W4A4 from 21.2 % (min/max) to 90.2 % in 7 min (at 4e-5: 55.8 %, at 1e-3:
# 87.3 %; suites/imagenet/README.md)
PTQ_DEFAULTS = {"pattern": "block", "prob": 0.5, "max_count": 500, "scale_lr": 2e-3,
                "round_mode": "learned_hard_sigmoid"}
PTQ_SMOKE_MAX_COUNT = 20  # --smoke, unless --ptq-config sets max_count
MP_CANDIDATES = (2, 4, 8)
MAX_DROP_LAYERS = 5
MP_BATCHES, MP_SAMPLES = 2, 16
BUDGET_FLAGS = (("--avg-bits", "avg_bits"), ("--size-kib", "size_kib"), ("--bops", "bops"))

# defaults of recipe-dependent flags that no recipe sets
RUNNER_DEFAULTS = dict(
    epochs=1, batch_size=32, lr=1e-4, optim="adam", weight_decay=0.0, workers=0, print_freq=100, calib_batches=32,
    train_images=None, val_images=None, val_batch_size=None, float_epochs=0, float_images=None, float_lr=1e-3,
    backend="TSQAT", distill_method=None, distill_alpha=0.95, temperature=6.0, freeze_bn_epoch=None,
    clip_grad_norm=None, onnx_batch=1, qparam_lr=None, warmup_steps=0,
)


class OneDefaultFormatter(argparse.HelpFormatter):
    """argparse's "(default: X)" for a flag with a fixed default; nothing where the help states the default already
    (a recipe-dependent flag: its argparse default is None, its help gives the recipes' values), for switches and for
    empty defaults."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text.lower() or action.default is None
                or action.default is False or action.default in ("", []) or action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def recipe_defaults(suite: Suite):
    """``d(key)``: the help text's " (default: X; embedded: Y)" of a recipe-dependent flag."""
    rec = _recipes(suite)

    def d(key: str) -> str:
        emb, gen = (rec[r].get(key, RUNNER_DEFAULTS.get(key)) for r in ("embedded", "general"))
        if emb is None and gen is None:
            return ""
        show = ["none" if v is None else v for v in (gen, emb)]
        return f" (default: {show[0]}; embedded: {show[1]})" if emb != gen else f" (default: {show[0]})"
    return d


def build_parser(suite: Suite) -> argparse.ArgumentParser:
    """The runner's flags in argument groups (timm's train.py layout), the suite's own in the data group."""
    p = argparse.ArgumentParser(description=f"ts_qat_pytorch {suite.name} suite: float -> calibration -> QAT "
                                "(distillation) -> int8 ONNX -> onnxruntime", formatter_class=OneDefaultFormatter)
    d = recipe_defaults(suite)
    for title, adds in FLAG_GROUPS:
        g = p.add_argument_group(title)
        for add in adds:
            add(g, suite, d)
    return p


def data_flags(g, suite: Suite, d) -> None:
    """Where the data and the float model come from, and the suite's own flags."""
    g.add_argument("--data", metavar="DIR", default=None, help="your data; absent: the suite's embedded default")
    g.add_argument("-j", "--workers", type=int, default=None, metavar="N", help="data loading workers" + d("workers"))
    g.add_argument("--pretrained", action="store_true", help="start from the zoo's pre-trained weights")
    g.add_argument("--model-path", default="", help="float weights (state_dict) to start from")
    g.add_argument("--train-images", type=int, default=None,
                   help="QAT on a random subset of this many training images per epoch" + d("train_images"))
    g.add_argument("--val-images", type=int, default=None,
                   help="evaluate on N validation images: a seeded subset with every class alike (default: all)")
    g.add_argument("--val-batch-size", type=int, default=None, help="evaluation batch (at least the training batch)")
    suite.add_arguments(g)


def training_flags(g, suite: Suite, d) -> None:
    """pytorch/examples' training flags, and the embedded float fine-tune's."""
    g.add_argument("--epochs", type=int, default=None, metavar="N", help="QAT epochs" + d("epochs"))
    g.add_argument("--start-epoch", type=int, default=0, metavar="N", help="manual epoch number (on restarts)")
    g.add_argument("-b", "--batch-size", type=int, default=None, metavar="N",
                   help="total mini-batch size over all processes" + d("batch_size"))
    g.add_argument("--lr", "--learning-rate", type=float, default=None, dest="lr",
                   help="initial learning rate" + d("lr"))
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--wd", "--weight-decay", type=float, default=None, dest="weight_decay",
                   help="weight decay" + d("weight_decay"))
    g.add_argument("--optim", default=None, choices=["sgd", "adam", "adamw"],
                   help="optimizer (adam means AdamW)" + d("optim"))
    g.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradient norm" + d("clip_grad_norm"))
    g.add_argument("--qparam-lr", type=float, default=None,
                   help="learning rate of the quantizers' learned scales / zero points (default: --lr). Adam moves "
                        "each parameter by about its rate per step, whatever its size: a 4-bit weight scale of 0.01 "
                        "at a weight's 5e-4 moves 5 %% a step" + d("qparam_lr"))
    g.add_argument("--warmup-steps", type=int, default=None, metavar="N",
                   help="QAT: linear LR warm-up over N steps before the cosine" + d("warmup_steps"))
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


def quantization_flags(g, suite: Suite, d) -> None:
    """Backend, bit widths, calibration, distillation."""
    g.add_argument("--backend", default=None, choices=BACKENDS, help="quantization backend" + d("backend"))
    g.add_argument("--w-bit", type=int, default=None, help="weight bits (Experimental backend)")
    g.add_argument("--a-bit", type=int, default=None, help="activation bits (Experimental backend)")
    g.add_argument("--first-last-bit", type=int, default=None,
                   help="bits of the first and the last layer (weights, inputs, output) when --w-bit/--a-bit are "
                        "lower (default 8; 0: quantize them like the rest)")
    g.add_argument("--qconfig", default=None, metavar="JSON_OR_FILE",
                   help="extra_qconfig_dict keys laid over the backend's defaults: a JSON object or a .json / .yaml "
                        "file, e.g. per-tensor weights '{\"w_qscheme\": {\"per_channel\": false}}' (keys: "
                        "w_qscheme, a_qscheme, w_observer, a_observer, w_fakequantize, a_fakequantize, *_params)")
    g.add_argument("--calib-batches", type=int, default=None, help="calibration batches" + d("calib_batches"))
    g.add_argument("--distill-method", default=None, choices=["kd", "none"],
                   help="distillation (kd = KL of softened logits * T^2)" + d("distill_method"))
    g.add_argument("--distill-alpha", type=float, default=None, help="loss = alpha*KD + (1-alpha)*CE"
                   + d("distill_alpha"))
    g.add_argument("--temperature", type=float, default=None, help="kd temperature" + d("temperature"))
    g.add_argument("--teacher-path", default="", help="teacher weights (state_dict); default teacher: the float model")


def ptq_flags(g, suite: Suite, d) -> None:
    """The post-training accuracy flags: --ptq-recon, --cle, --smoothquant, --bias-correction."""
    g.add_argument("--ptq-recon", action="store_true",
                   help="PTQ reconstruction (AdaRound / BRECQ / QDrop) after calibration, before QAT; --epochs 0: "
                        "PTQ only (evaluate, save and export the reconstructed model)")
    g.add_argument("--ptq-config", default=None, metavar="JSON_OR_FILE",
                   help="reconstruction config laid over the default " + json.dumps(PTQ_DEFAULTS) + ": a JSON "
                        "object or a .json / .yaml file with the ancestor's keys (pattern, scale_lr, warm_up, weight, "
                        "max_count, b_range, keep_gpu, round_mode, prob, block_depth; an ancestor config nested "
                        "under quantize.reconstruction is read too)")
    g.add_argument("--ptq-images", type=int, default=1024, metavar="N",
                   help="calibration images the reconstruction fits on and --bias-correction measures on (from the "
                        "calibration batches)")
    g.add_argument("--cle", action="store_true",
                   help="before prepare: fold the BatchNorms, equalize conv -> [ReLU / ReLU6] -> conv chains (cross-"
                        "layer equalization; a ReLU6 on them becomes ReLU) and absorb high biases "
                        "(ts_qat_pytorch.tools.equalize); the float model is evaluated again after it")
    g.add_argument("--smoothquant", type=float, nargs="?", const=0.5, default=None, metavar="ALPHA",
                   help="before prepare: SmoothQuant of each LayerNorm -> Linear group, migration strength ALPHA in "
                        "(0, 1) (0.5 when the flag is given alone), activation ranges from the calibration batches "
                        "(ts_qat_pytorch.tools.smooth_quant)")
    g.add_argument("--bias-correction", action="store_true",
                   help="after calibration, before --ptq-recon and QAT: empirical bias correction, each quantized "
                        "layer's mean output shift from float taken off its bias "
                        "(ts_qat_pytorch.advanced_ptq.bias_correction)")


def mixed_precision_flags(g, suite: Suite, d) -> None:
    """--mixed-precision and its budget, --max-drop (accuracy control)."""
    g.add_argument("--mixed-precision", action="store_true",
                   help="per-layer weight bits from a sensitivity search on the float model under one budget "
                        "(--avg-bits, --size-kib or --bops); writes <arch>_mixed_precision/ (JSON, CSV, PNG)")
    g.add_argument("--avg-bits", type=float, default=None, help="budget: parameter-weighted average weight bits")
    g.add_argument("--size-kib", type=float, default=None, help="budget: quantized weights, KiB")
    g.add_argument("--bops", type=float, default=None,
                   help="budget: bit operations per sample (MACs x weight bits x activation bits)")
    g.add_argument("--candidates", type=int, nargs="+", default=None, metavar="BITS",
                   help=f"weight bit widths the search picks from (default {' '.join(map(str, MP_CANDIDATES))})")
    g.add_argument("--act-candidates", type=int, nargs="+", default=None, metavar="BITS",
                   help="activation bit widths to search per layer too (default: every layer at --a-bit)")
    g.add_argument("--sensitivity-method", default="hessian", choices=["hessian", "loss"],
                   help="hessian: Hutchinson trace x weight perturbation (HAWQ); loss: the measured loss increase")
    g.add_argument("--mp-batches", type=int, default=None, metavar="N",
                   help="calibration batches of the sensitivity search and of --max-drop's layer ranking "
                        f"({MP_BATCHES}; --smoke 1)")
    g.add_argument("--mp-samples", type=int, default=None, metavar="N",
                   help=f"Hutchinson vectors per batch, hessian ({MP_SAMPLES}; --smoke 2)")
    g.add_argument("--mp-blockwise", action="store_true",
                   help="hessian: each layer's trace from vectors on that layer alone (exact in expectation, but one "
                        "Hessian-vector product per layer and vector: 50x slower on mobilenet_v2) instead of one "
                        "product per vector for all layers together (PyHessian's estimator)")
    g.add_argument("--max-drop", type=float, default=None, metavar="X",
                   help="after PTQ / QAT, if the metric is more than X worse than float: raise the most sensitive "
                        "layers to 8 bits (left float when every layer is 8-bit already, or with --max-drop-float), "
                        "fewest first, redoing the run's calibration / reconstruction / QAT, until within X or "
                        "--max-drop-layers; the best model is saved and exported")
    g.add_argument("--max-drop-layers", type=int, default=None, metavar="N",
                   help=f"change at most N layers ({MAX_DROP_LAYERS})")
    g.add_argument("--max-drop-float", action="store_true",
                   help="--max-drop leaves the layers it changes float instead of raising them to 8 bits")


def output_flags(g, suite: Suite, d) -> None:
    """Where the outputs go, what is exported and evaluated, logging."""
    g.add_argument("--resume", default="", metavar="PATH", help="QAT checkpoint to resume (epoch, optimizer, "
                   "LR schedule, fake-quant state, RNG)")
    g.add_argument("-e", "--evaluate", action="store_true", help="evaluate (and export) only")
    g.add_argument("--output-dir", default="checkpoint",
                   help=f"outputs go to <output-dir>/{suite.name}/ (checkpoints, ONNX, qparams, metrics, profile)")
    g.add_argument("--metrics", default=None, help=f"metrics JSON (default <output-dir>/{suite.name}/<arch>_metrics.json)")
    g.add_argument("--baselines", default=None,
                   help="compare the metrics with this baselines.json at the end; exit 1 on failure")
    g.add_argument("--cache-dir", default=None, help=f"float fine-tune cache (default $TS_QAT_CACHE/{suite.name})")
    g.add_argument("--onnx-batch", type=int, default=None,
                   help="batch size baked into the exported ONNX" + d("onnx_batch"))
    g.add_argument("--opset-version", type=int, default=18, help="ONNX opset of the export (13..21)")
    g.add_argument("--no-export", action="store_true", help="no ONNX export (checkpoints only)")
    g.add_argument("--no-ort-eval", action="store_true", help="skip the onnxruntime evaluation")
    g.add_argument("--deploy", nargs="+", default=[], choices=["rknn"], metavar="TARGET",
                   help="also import the exported file into a deployment toolchain and evaluate it there: rknn "
                        "(rknn-toolkit2's NPU simulator; needs $TS_QAT_RKNN_PYTHON, `nox -s deploy_check` sets it)")
    g.add_argument("--deploy-platform", default="rk3588", help="the NPU the rknn target builds for")
    g.add_argument("--profile", action="store_true",
                   help="per-layer float vs fake-quant comparison (table, <arch>_profile.csv and .png)")
    g.add_argument("--sensitivity", action="store_true",
                   help="one layer at a time left float, the metric on the validation set: ranking, "
                        "<arch>_sensitivity.json / .png and <arch>_exclude.json (prepare_by_platform's exclusions)")
    g.add_argument("-p", "--print-freq", type=int, default=None, help="log every N batches" + d("print_freq"))
    g.add_argument("-l", "--log-level", type=int, default=1, choices=[0, 1, 2, 3],
                   help="0 debug, 1 info, 2 warning, 3 error")
    g.add_argument("--smoke", action="store_true", help="tiny run of the whole pipeline (a few steps) for tests")


def device_flags(g, suite: Suite, d) -> None:
    """Devices and processes (DistributedDataParallel)."""
    g.add_argument("--device", default=None,
                   help="cpu, a GPU index (0), GPU indices (0,1: one process each, DistributedDataParallel), cuda "
                        "(every visible GPU) or cuda:N; GPU indices become CUDA_VISIBLE_DEVICES, as in ultralytics "
                        "(default: the first GPU, else the CPU; under torchrun the GPU of each local rank)")
    g.add_argument("--gpu", type=int, default=None, help="GPU id to use (the manual's flag; = --device N)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; $TS_QAT_THREADS)")
    g.add_argument("--world-size", type=int, default=-1, help="number of nodes (or processes under torchrun)")
    g.add_argument("--rank", type=int, default=-1, help="node rank")
    g.add_argument("--dist-url", default="env://", help="url used to set up distributed training")
    g.add_argument("--dist-backend", default="nccl", help="distributed backend (gloo is used on CPU)")
    g.add_argument("--multiprocessing-distributed", action="store_true",
                   help="launch N processes per node (N = the devices' GPUs, or 2 on CPU) with DistributedDataParallel")


ACCURACY = "accuracy beyond plain QAT (ts_qat_pytorch.advanced_ptq, ts_qat_pytorch.mix_precision)"
FLAG_GROUPS = (("data and model", (data_flags,)), ("training", (training_flags,)),
               ("quantization and distillation", (quantization_flags,)), (ACCURACY, (ptq_flags, mixed_precision_flags)),
               ("outputs", (output_flags,)), ("devices and processes", (device_flags,)))


def _recipes(suite: Suite) -> dict:
    r = suite.recipes or {}
    return {"embedded": r.get("embedded", {}), "general": r.get("general", {})}


#: flags every config has, whether or not a suite declares them (a classifier's -nc, a zoo's -a / --teacher-arch)
SHARED_FLAGS = ("arch", "num_classes", "teacher_arch")


def resolve(suite: Suite, flags: argparse.Namespace) -> RunConfig:
    """The flags resolved once into the run's frozen config: the recipe filled, --smoke applied, ranges and the
    suite's checks (before any work; SuiteError for a flag that would fail late or train nonsense), and what the
    suite resolves (its ``check``'s returned flags) laid over the runner's defaults."""
    flags.embedded = flags.data is None
    flags.lr_given = flags.lr is not None  # an explicit --lr (a --resume with another one is reported)
    for key in SHARED_FLAGS:
        vars(flags).setdefault(key, None)
    given = {k for k, v in vars(flags).items() if v is not None}
    for k, v in {**RUNNER_DEFAULTS, **suite.recipe(flags)}.items():
        if vars(flags).get(k) is None:
            setattr(flags, k, v)
    if flags.smoke:
        for k, v in suite.smoke.items():
            if k not in given:
                setattr(flags, k, v)
    if flags.freeze_bn_epoch is not None and flags.freeze_bn_epoch < 0:
        flags.freeze_bn_epoch = None
    if flags.distill_method == "none":
        flags.distill_method = None
    if flags.seed is None and flags.embedded:
        flags.seed = 0
    check_backend(flags, given)
    check_ranges(flags)
    flags.arch = flags.arch or suite.name
    # what a suite's check may decide otherwise
    flags.teacher, flags.embedded_weights, flags.out_dir = "float", True, None
    flags.finetune_float = flags.embedded and not flags.model_path and flags.float_epochs > 0
    vars(flags).update(suite.check(flags) or {})
    flags.out_dir = flags.out_dir or os.path.join(flags.output_dir, suite.name)
    flags.teacher_arch = flags.teacher_arch or flags.arch
    flags.teacher = choose_teacher(flags)
    if flags.metrics is None:
        flags.metrics = os.path.join(flags.out_dir, f"{flags.arch}_metrics.json")
    check_accuracy_flags(flags)
    return RunConfig(dict(vars(flags)))


def choose_teacher(flags) -> str | None:
    """Where the distillation teacher comes from: "path" (--teacher-path), else the suite's choice ("float": a copy
    of the float model the student starts from; "zoo": its --teacher-arch), None without distillation."""
    if not flags.distill_method or flags.not_qat or flags.evaluate:
        return None
    return "path" if flags.teacher_path else flags.teacher


def check_backend(flags: argparse.Namespace, given: set) -> None:
    """--mixed-precision's backend, --w-bit / --a-bit against the backend, batch sizes."""
    if flags.mixed_precision:  # per-layer bits: the Experimental backend (TSQAT if the search gives 8 bits everywhere)
        if "backend" in given and flags.backend != "Experimental":
            raise SuiteError(f"--mixed-precision with --backend {flags.backend}: the per-layer bits need the "
                             "Experimental backend (the run uses TSQAT when every layer gets 8 bits); drop --backend")
        flags.backend = "Experimental"
    if flags.backend != "Experimental" and (flags.w_bit or flags.a_bit) and (flags.w_bit, flags.a_bit) != (8, 8):
        raise SuiteError(f"--w-bit/--a-bit need --backend Experimental ({flags.backend} has fixed bit widths)")
    if flags.onnx_batch < 1 or flags.batch_size < 1:
        raise SuiteError("--onnx-batch and --batch-size must be >= 1")


def check_accuracy_flags(args: argparse.Namespace) -> None:
    """--ptq-recon, --mixed-precision and --max-drop: bad combinations and ranges before any work; fills
    ``args.ptq_config`` (a dict: the default laid under --ptq-config), ``args.budget`` ({"avg_bits": 4} ...),
    ``args.candidates``, ``args.act_candidates``."""
    if args.epochs < 0:
        raise SuiteError(f"--epochs {args.epochs} must be >= 0 (0: no QAT, e.g. PTQ only with --ptq-recon)")
    quantizing = "--not-qat" if args.not_qat else None
    # PTQ reconstruction
    if args.ptq_config is not None and not args.ptq_recon:
        raise SuiteError("--ptq-config configures --ptq-recon; add --ptq-recon")
    if args.ptq_recon:
        if quantizing:
            raise SuiteError("--ptq-recon reconstructs a quantized model; it cannot be combined with --not-qat")
        if args.ptq_images < 1:
            raise SuiteError(f"--ptq-images {args.ptq_images} must be >= 1")
        user = parse_ptq_config(args.ptq_config) if args.ptq_config is not None else {}
        cfg = {**PTQ_DEFAULTS, **user}
        if args.smoke and "max_count" not in user:
            cfg["max_count"] = PTQ_SMOKE_MAX_COUNT
        from ts_qat_pytorch.advanced_ptq import ReconstructionConfig
        try:
            ReconstructionConfig.from_any(cfg)
        except (ValueError, TypeError) as exc:
            raise SuiteError(f"--ptq-config: {exc}") from None
        args.ptq_config = cfg
    check_post_training_flags(args, quantizing)
    # mixed precision
    budgets = [(flag, getattr(args, dest)) for flag, dest in BUDGET_FLAGS if getattr(args, dest) is not None]
    mp_only = [flag for flag, v in (("--candidates", args.candidates), ("--act-candidates", args.act_candidates))
               if v is not None] + [flag for flag, _ in budgets]
    if not args.mixed_precision:
        if mp_only:
            raise SuiteError(f"{', '.join(mp_only)} {'configures' if len(mp_only) == 1 else 'configure'} "
                             "--mixed-precision; add --mixed-precision")
        args.budget = None
    else:
        if quantizing:
            raise SuiteError("--mixed-precision picks bits of a quantized model; it cannot be combined with --not-qat")
        if len(budgets) != 1:
            raise SuiteError("--mixed-precision needs exactly one budget: --avg-bits N (average weight bits), "
                             "--size-kib N (quantized weights) or --bops N (bit operations per sample)"
                             + (f"; got {' and '.join(f for f, _ in budgets)}" if budgets else ""))
        if args.w_bit is not None:
            raise SuiteError("--w-bit with --mixed-precision: the search picks each layer's weight bits from "
                             "--candidates; drop --w-bit")
        args.candidates = sorted(set(args.candidates or MP_CANDIDATES))
        args.act_candidates = sorted(set(args.act_candidates)) if args.act_candidates else None
        for flag, bits in (("--candidates", args.candidates), ("--act-candidates", args.act_candidates or [])):
            bad = [b for b in bits if not 2 <= b <= 8]
            if bad:
                raise SuiteError(f"{flag} {' '.join(map(str, bad))}: bit widths must be within 2..8 (the "
                                 "Experimental backend's range)")
        (flag, value), = budgets
        if not (math.isfinite(value) and value > 0):
            raise SuiteError(f"{flag} {value} must be a finite number > 0")
        if flag == "--avg-bits" and value < min(args.candidates):
            raise SuiteError(f"--avg-bits {value:g} is below the smallest of --candidates "
                             f"{' '.join(map(str, args.candidates))}: no allocation reaches it; lower the "
                             "candidates or raise the budget")
        args.budget = {"--avg-bits": {"avg_bits": value}, "--size-kib": {"size_bits": value * 8192},
                       "--bops": {"bops": value}}[flag]
    if args.mp_batches is None:
        args.mp_batches = 1 if args.smoke else MP_BATCHES
    if args.mp_samples is None:
        args.mp_samples = 2 if args.smoke else MP_SAMPLES
    if args.mp_batches < 1 or args.mp_samples < 1:
        raise SuiteError("--mp-batches and --mp-samples must be >= 1")
    # accuracy control
    if args.max_drop is not None:
        if quantizing:
            raise SuiteError("--max-drop controls the drop of a quantized model from float; it cannot be combined "
                             "with --not-qat")
        if not (math.isfinite(args.max_drop) and args.max_drop >= 0):
            raise SuiteError(f"--max-drop {args.max_drop} must be a finite number >= 0 (the allowed drop of the "
                             "suite's metric from float, e.g. --max-drop 1.0)")
        args.max_drop_layers = MAX_DROP_LAYERS if args.max_drop_layers is None else args.max_drop_layers
        if args.max_drop_layers < 1:
            raise SuiteError(f"--max-drop-layers {args.max_drop_layers} must be >= 1")
    elif args.max_drop_float or args.max_drop_layers is not None:
        raise SuiteError("--max-drop-layers / --max-drop-float configure --max-drop; add --max-drop X")


def check_post_training_flags(args: argparse.Namespace, quantizing: str | None) -> None:
    """--cle, --smoothquant, --bias-correction and --qconfig: ranges and combinations before any work; fills
    ``args.qconfig`` (a dict of extra_qconfig_dict keys). Whether the model has anything to equalize / smooth is
    checked once it is built (suites/common/post_training.py), a --resume checkpoint against --cle / --smoothquant
    with the checkpoint (checkpoints.check_resume)."""
    steps = [flag for flag, on in (("--cle", args.cle), ("--smoothquant", args.smoothquant is not None),
                                   ("--bias-correction", args.bias_correction), ("--qconfig", args.qconfig is not None))
             if on]
    if steps and quantizing:
        raise SuiteError(f"{', '.join(steps)}: {'it prepares' if len(steps) == 1 else 'they prepare'} a model for "
                         "quantization; not with --not-qat")
    if args.smoothquant is not None and not (math.isfinite(args.smoothquant) and 0 < args.smoothquant < 1):
        raise SuiteError(f"--smoothquant {args.smoothquant} must be in (0, 1): the migration strength alpha (0.5, the "
                         "paper's default, when the flag is given alone)")
    if args.qconfig is not None:
        args.qconfig = parse_qconfig(args.qconfig, args)


def parse_qconfig(text: str, args: argparse.Namespace) -> dict:
    """--qconfig: extra_qconfig_dict keys (a JSON object or a .json / .yaml file; an object with an
    "extra_qconfig_dict" entry is read too), checked against the backend's defaults and bit widths."""
    cfg = read_config(text, "--qconfig", '{"w_qscheme": {"per_channel": false}}')
    if isinstance(cfg.get("extra_qconfig_dict"), dict):
        cfg = cfg["extra_qconfig_dict"]
    for flag, key in (("--w-bit", "w_qscheme"), ("--a-bit", "a_qscheme")):
        if getattr(args, flag[2:].replace("-", "_")) is not None and "bit" in (cfg.get(key) or {}):
            raise SuiteError(f"--qconfig sets {key} bit and {flag} is given too: give the bits once")
    from ts_qat_pytorch.quantization.qconfig import QConfig
    from ts_qat_pytorch.utils.registry import lookup_backend
    try:
        quantizer, defaults = lookup_backend(args.backend)
        QConfig.from_dict(defaults, cfg).check_bits(quantizer.allowed_bits, quantizer.wide_activation_bits)
    except (ValueError, TypeError, KeyError) as exc:
        raise SuiteError(f"--qconfig (backend {args.backend}): {exc}") from None
    return cfg


def read_config(text: str, flag: str, example: str) -> dict:
    """A flag's JSON object, or a .json / .yaml / .yml file holding one."""
    source = flag
    if os.path.isfile(text):
        source = f"{flag} '{text}'"
        with open(text) as f:
            body = f.read()
        if text.lower().endswith((".yaml", ".yml")):
            import yaml
            try:
                cfg = yaml.safe_load(body)
            except yaml.YAMLError as exc:
                raise SuiteError(f"{source} is not valid YAML ({exc})") from None
        else:
            cfg = _json(body, source)
    elif text.lstrip().startswith("{"):
        cfg = _json(text, source)
    else:
        raise SuiteError(f"{flag} '{text}' is neither a file nor a JSON object (e.g. {flag} '{example}')")
    if not isinstance(cfg, dict):
        raise SuiteError(f"{source} must hold an object, got {type(cfg).__name__}")
    return cfg


def parse_ptq_config(text: str) -> dict:
    """--ptq-config: a JSON object, or a .json / .yaml / .yml file holding one (the ancestor's YAML config, with the
    reconstruction settings at the top or under quantize.reconstruction / reconstruction)."""
    cfg = read_config(text, "--ptq-config", '{"max_count": 20000}')
    if isinstance(cfg.get("quantize"), dict):
        cfg = cfg["quantize"]
    if isinstance(cfg.get("reconstruction"), dict):
        cfg = cfg["reconstruction"]
    return cfg


def _json(text: str, source: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SuiteError(f"{source} is not valid JSON ({exc})") from None


def check_ranges(args: argparse.Namespace) -> None:
    """Numbers that would fail late (the opset at the first export, after an epoch) or silently train nonsense
    (a negative or NaN learning rate): errors before any work."""
    for flag, v in (("--lr", args.lr), ("--float-lr", args.float_lr), ("--qparam-lr", args.qparam_lr)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise SuiteError(f"{flag} {v} must be a finite number > 0 (e.g. {flag} 1e-4)")
    if args.warmup_steps < 0:
        raise SuiteError(f"--warmup-steps {args.warmup_steps} must be >= 0")
    if args.workers < 0:
        raise SuiteError(f"-j/--workers {args.workers} must be >= 0 (0: load data in the main process)")
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
