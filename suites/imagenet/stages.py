"""Stages of the ImageNet suite's pipeline: timing and metrics, the cached float fine-tune, evaluation, export,
onnxruntime scoring, profiling, checkpoints, the distributed replica check and the final summary."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.data

from suites.common.stages import Stages
from suites.imagenet.cli import is_main, say
from suites.imagenet.engine import (EpochSubsetSampler, cosine_schedule, loader, make_optimizer, rng_state,
                                    set_rng_state, train, validate, validate_onnx)

logger = logging.getLogger("imagenet")


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
            model.to(args.device, memory_format=torch.channels_last)
            for ep in range(args.float_epochs):
                sampler.set_epoch(ep)
                train(dl, model, nn.CrossEntropyLoss(), opt, sched, ep, args.device, args, prefix="Float")
            model.to("cpu", memory_format=torch.contiguous_format)
            atomic_torch_save({"state_dict": model.state_dict(), "key": key}, path)
            say(args, f"=> fine-tuned float model cached at {path}")
        if getattr(args, "distributed", False):
            dist.barrier()
            if not is_main(args):
                model.load_state_dict(load_checkpoint(path)["state_dict"])


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
        acc1, acc5 = validate_onnx(val_loader, stages.metrics["onnx_path"], args.onnx_batch, args,
                                   prefix="ORT int8")
    stages.metrics.update(ort_top1=round(acc1, 3), ort_top5=round(acc5, 3))
    if "qat_top1" in stages.metrics:
        stages.metrics["ort_minus_qat"] = round(acc1 - stages.metrics["qat_top1"], 3)
    say(args, f"=> ORT int8 top-1 {acc1:.3f} top-5 {acc5:.3f} ({stages.metrics['onnx_path']})")


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
