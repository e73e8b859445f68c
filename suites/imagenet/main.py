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

import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:  # running the file directly from a checkout
    sys.path.insert(0, _REPO)

import logging
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.data

from suites.imagenet.cli import BAD_INPUT, SuiteError, build_parser, is_main, resolve_args, say, set_log_level
from suites.imagenet.models import (build_teacher, check_arch, check_shapes, choose_teacher, create_model,
                                    load_float_weights, prepare, read_checkpoint, read_state_dict)
from suites.imagenet.engine import (EpochSubsetSampler, cosine_schedule, loader, make_datasets, make_optimizer,
                                    report_skips, seed_everything, set_rng_state, train, validate)
from suites.imagenet.stages import (Stages, checkpoint_paths, embedded_float_stage, evaluate_qat, export_stage, finish,
                                    ort_stage, profile_stage, replica_check, save_checkpoint_all, train_float)

logger = logging.getLogger("imagenet")


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
        print(f"error: {error_message(exc)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the last complete checkpoints in {args.output_dir} are intact (writes are atomic)",
              file=sys.stderr, flush=True)
        return 130


def error_message(exc: BaseException) -> str:
    """The error's own text; one raised in a DataLoader worker arrives wrapped with the worker's traceback, of
    which the last line is the error itself."""
    msg = str(exc)
    if "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg


def check_resume(args) -> None:
    """--resume before long work: readable, a QAT checkpoint, and a --lr that differs from the one its optimizer and
    LR schedule restore is reported (the checkpoint's is used)."""
    from suites.common.resume import lr_change_message
    ck = read_checkpoint(args.resume, "--resume")
    sd = read_state_dict(args.resume, "--resume", ck)
    if not any("fake_quant" in k for k in sd):
        raise SuiteError(f"--resume '{args.resume}' is not a QAT checkpoint (no fake-quant state); give float "
                         "weights with --model-path")
    if not args.evaluate and isinstance(ck, dict) and "optimizer" in ck:
        msg = lr_change_message(ck, args.lr, args.resume, args.lr_given)
        if msg and is_main(args):
            logger.warning(msg)


def record_skips(stages, **datasets) -> None:
    """Unreadable images skipped so far (--on-bad-image skip), per data set, into the metrics JSON."""
    from suites.imagenet.data import skipped_images
    counts = {k: skipped_images(d) for k, d in datasets.items()}
    counts = {k: v for k, v in counts.items() if v is not None}
    if counts:
        stages.metrics["skipped_images"] = counts


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
        print(f"error: {error_message(exc)}", file=sys.stderr, flush=True)
        return 2
    finally:
        if args.distributed and dist.is_initialized():
            dist.destroy_process_group()


def run(args) -> int:
    stages = Stages(args.metrics, "imagenet", log=lambda msg: say(args, msg), embedded=args.embedded, arch=args.arch,
                    backend=None if args.not_qat else args.backend)
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
    if args.resume and args.not_qat:
        raise SuiteError("--resume restores QAT checkpoints; with --not-qat use --model-path")
    for flag, path in (("--model-path", args.model_path), ("--teacher-path", args.teacher_path)):
        if path:
            read_state_dict(path, flag)  # readable, a state_dict
    if args.resume:
        check_resume(args)
    args.teacher_source = choose_teacher(args)  # a zoo teacher with a random new head is refused here
    train_ds, val_ds, calib_ds = make_datasets(args)
    datasets = dict(train=train_ds, val=val_ds, calib=calib_ds)
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
    model.to(args.device, memory_format=torch.channels_last)  # float evaluation: faster in this layout

    if args.embedded or (args.evaluate and not qat):
        if is_main(args):
            with stages.timed("float_eval"):
                acc1, acc5 = validate(val_loader, model, criterion, args, prefix="Float")
            stages.metrics.update(float_top1=round(acc1, 3), float_top5=round(acc5, 3))
            say(args, f"=> float top-1 {acc1:.3f} top-5 {acc5:.3f}")
    if not qat:
        if not args.embedded and not args.evaluate:
            train_float(model, train_ds, val_loader, criterion, args, stages, paths)
        record_skips(stages, **datasets)
        stages.write()
        return finish(args, stages)

    # ---- QAT: teacher (checked before long work), prepare, calibrate (unless resuming), train, export
    model.to(memory_format=torch.contiguous_format)  # the traced QAT model gains nothing from channels_last
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
                from suites.imagenet.data import skipped_images
                before = skipped_images(calib_ds)
                for i, (images, _t) in enumerate(calib_loader):
                    q(images.to(args.device))
                report_skips(calib_loader, before, "Calibration")
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
        sd = read_state_dict(args.resume, "--resume")  # a QAT checkpoint: checked before long work (check_resume)
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
        record_skips(stages, **datasets)
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
    record_skips(stages, **datasets)
    stages.write()
    return finish(args, stages)


if __name__ == "__main__":
    sys.exit(main())
