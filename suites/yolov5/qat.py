"""The QAT half of train_qat.py: prepare the network part, calibrate, fine-tune with fake quantization,
evaluate (fake-quant), export the QDQ ONNX + parameter JSON, evaluate the int8 ONNX in onnxruntime."""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from . import pipeline as P
from .evaluate import onnx_predictor, torch_predictor
from .trainer import train_steps

say = P.say


def prepare(model, backend: str):
    from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
    return prepare_by_platform(copy.deepcopy(model).cpu().eval(), BackendType(backend))


def run_qat(model, train, ev: P.Evaluator, hyp: dict, meta: dict, args, stages) -> None:
    from ts_qat_pytorch.utils.state import freeze_bn_stats
    from ts_qat_pytorch.utils.utils import load_qat_checkpoint, save_checkpoint, save_qat_checkpoint
    name = args.name
    q = prepare(model, args.backend).to(args.device)
    ckpt_path = os.path.join(args.output_dir, f"{name}_qat_checkpoint.pth")
    if args.resume:
        try:
            load_qat_checkpoint(args.resume, q)
        except (ValueError, RuntimeError, KeyError, FileNotFoundError) as exc:
            raise P.D.DataError(f"--resume '{args.resume}': {exc}") from exc
        say(f"=> restored the QAT checkpoint {args.resume}")
    else:
        calib_batches = int(hyp.get("calib_batches", 16))
        with stages.timed("calibration"):
            dl = P.val_loader(train if train else ev.records, args.img_size, max(1, args.batch_size), 0)
            n = P.calibrate(q, dl, calib_batches)
        say(f"=> calibrated on {n} images ({calib_batches} batches)")
        stages.run["calib_images"] = n
        rng = hyp.get("out_range")
        if rng:
            stages.extras["out_ranges"] = clip_output_ranges(q, float(rng[0]), float(rng[1]))
            say(f"=> output quantizer ranges clipped to [{rng[0]}, {rng[1]}]: {stages.extras['out_ranges']}")
    if not args.export_only:
        torch.manual_seed(args.seed + 1 + (dist.get_rank() if dist.is_initialized() else 0))
        dl, sampler = P.train_loader(train, args.img_size, args.batch_size, args.workers, args.seed + 1)
        steps = args.steps or args.epochs * len(dl)
        teacher = None
        if float(hyp.get("distill", 0.0)) > 0:
            teacher = copy.deepcopy(model).to(args.device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        freeze_at = hyp.get("freeze_bn_step", 0)
        if freeze_at is not None and int(freeze_at) <= 0:
            freeze_bn_stats(q)
        qm = nn.parallel.DistributedDataParallel(q) if dist.is_initialized() else q

        def on_step(step):
            if freeze_at is not None and step + 1 == int(freeze_at):
                freeze_bn_stats(q)
            if (step + 1) % len(dl) == 0 and P.is_main():
                save_qat_checkpoint(ckpt_path, q, epoch=(step + 1) // len(dl), step=step + 1, cfg=name)
        with stages.timed("qat_train"):
            r = train_steps(qm, dl, steps, hyp, float(hyp.get("lr0", 5e-4)), meta_anchors(meta), ev_nc(meta),
                            args.img_size, say, prefix="QAT", teacher=teacher, sampler=sampler, device=args.device,
                            on_step=on_step)
        stages.run.update(qat_steps=steps, qat_train_loss=r["loss"], qat_step_s=r["step_s"])
        if P.is_main():
            save_qat_checkpoint(ckpt_path, q, step=steps, cfg=name)
    if not P.is_main():
        return
    q.eval()
    with stages.timed("qat_eval"):
        r = ev.run(torch_predictor(q, args.device), "QAT")
    stages.score("qat", r)
    save_checkpoint(q.cpu(), os.path.join(args.output_dir, f"{name}_qat_float.pth"),
                    os.path.join(args.output_dir, f"{name}_qat_qparams_full.json"))
    q.to(args.device)
    stages.files["checkpoint"] = ckpt_path
    if args.no_export:
        return
    with stages.timed("export"):
        info = P.export(q.cpu(), args.img_size, args.output_dir, name, meta)
    stages.record_export(info, onnx_batch=1)
    say(f"=> exported {info.onnx_path}: {info.quantized_layers} quantized layers, integer kernels "
        f"{info.integer_kernels} ({stages.extras.get('conv_layers')} convolutions in the network)")
    with stages.timed("ort_eval"):
        r = ev.run(onnx_predictor(info.onnx_path, threads=torch.get_num_threads()), "ORT int8")
    stages.score("ort", r)


def clip_output_ranges(q, lo: float, hi: float) -> list:
    """Narrow the calibrated range of the network's output quantizers (the raw Detect maps) to [lo, hi].

    The raw maps are logits: background objectness / class logits reach -18..-30, which min/max calibration
    must cover, so one uint8 step is 0.1-0.16 and box regressions lose precision (mAP@.5:.95 -1.7 points on the
    default). Below -6 the sigmoid is < 0.0025 and above 6 it is > 0.9975: clipping there changes no decision,
    and the step shrinks to 12/255. The core has no per-quantizer range override, so this sets the calibrated
    (scale, zero point) of those quantizers from the clipped range; LSQ then keeps learning the scale."""
    from ts_qat_pytorch.observer import qparams_from_minmax
    out = next(n for n in q.graph.nodes if n.op == "output")
    args = out.args[0] if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    ranges = []
    for a in args:
        fq = q.get_submodule(a.target) if a.op == "call_module" else None
        if fq is None or not hasattr(fq, "qparams") or not hasattr(fq, "scheme"):
            continue
        s, z = fq.qparams()
        cur_lo, cur_hi = (fq.quant_min - z.float()) * s, (fq.quant_max - z.float()) * s
        ns, nz = qparams_from_minmax(torch.clamp(cur_lo, min=lo), torch.clamp(cur_hi, max=hi), fq.scheme)
        with torch.no_grad():
            fq.scale.copy_(ns.reshape(fq.scale.shape))
            fq.zero_point.copy_(nz.reshape(fq.zero_point.shape).to(fq.zero_point.dtype))
        ranges.append([round(float(cur_lo), 2), round(float(cur_hi), 2), round(float(ns), 5)])
    return ranges


def meta_anchors(meta):
    return torch.tensor(meta["anchors"])


def ev_nc(meta):
    return int(meta["nc"])
