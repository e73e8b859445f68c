"""The stages after the float model: float eval -> split + prepare -> calibration -> QAT (kd) -> QAT eval
-> export (QDQ ONNX + qparams JSON) -> ORT int8 eval -> ORT latency int8 vs fp32 -> baselines."""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

from suites.common.training import cosine_schedule, make_optimizer
from suites.transformers.model import EncoderClassifier, attention_bias, count_targets, prepare_config
from suites.transformers.train import (evaluate, hf_forward, is_main, ort_latency, qat_param_groups, say,
                                       split_forward, train_epoch)


def calibrate(q, batches, num_batches: int) -> None:
    """The core's calibrate with this suite's forward: (ids, mask, label) batches trimmed to their longest row,
    the mask turned into the attention bias outside the traced part."""
    from ts_qat_pytorch.utils.calibrate import calibrate as core_calibrate
    from suites.transformers.data import trim_batch

    def forward(model, batch):
        ids, mask = trim_batch(batch[0], batch[1])
        return model(ids, attention_bias(mask))
    core_calibrate(q, batches, num_batches=num_batches, forward=forward)


def export_dummy(args):
    ids = torch.full((args.onnx_batch, args.onnx_length), 1000, dtype=torch.long)
    return ids, attention_bias(torch.ones(args.onnx_batch, args.onnx_length, dtype=torch.long))


def after_float(hf, tok, tl, vl, test, names, args, stages) -> int:
    from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
    m, n = stages, len(names)
    with stages.timed("float_eval"):
        m.score("float", evaluate(vl, hf_forward(hf), hf, n, "Float"))
    if args.not_qat:
        return stages.finish(args.baselines)
    split = EncoderClassifier(hf).eval()
    teacher = copy.deepcopy(split).eval() if args.distill_method == "kd" else None
    float_split = copy.deepcopy(split).eval()
    q = prepare_by_platform(split, BackendType(args.backend), prepare_config())
    linears, matmuls = count_targets(float_split)
    m.extras["split"] = {"linear": linears, "attention_matmuls": matmuls}
    start_epoch = 0
    opt = make_optimizer(qat_param_groups(q, args.lr, args.qparam_lr), args.optim, args.lr, wd=args.weight_decay)
    steps = min(len(tl), args.qat_steps or len(tl)) * args.epochs
    sched = cosine_schedule(opt, steps, max(1, steps // 10))
    ckpt = os.path.join(args.output_dir, "minilm_qat_checkpoint.pth" if args.model is None else "encoder_qat_checkpoint.pth")
    if args.resume:
        from ts_qat_pytorch.utils.utils import load_qat_checkpoint
        calibrate(q, tl, 1)  # shapes the lazily-sized quantizer buffers, then the checkpoint overwrites them
        from suites.transformers.model import ModelError
        try:
            ck = load_qat_checkpoint(args.resume, q, None if args.evaluate else opt, None if args.evaluate else sched)
        except (ValueError, RuntimeError, KeyError) as e:
            raise ModelError(f"--resume '{args.resume}': {(str(e).splitlines() or [''])[0][:300]}") from e
        start_epoch = int(ck.get("epoch", 0))
        say(f"=> resumed {args.resume} (epoch {start_epoch})")
    else:
        with stages.timed("calibration"):
            calibrate(q, tl, args.calib_batches)
    if not args.evaluate and start_epoch < args.epochs:
        from ts_qat_pytorch.utils.utils import save_qat_checkpoint
        model = torch.nn.parallel.DistributedDataParallel(q) if dist.is_initialized() else q
        with stages.timed("qat_train"):
            for ep in range(start_epoch, args.epochs):
                if hasattr(tl.sampler, "set_epoch"):
                    tl.sampler.set_epoch(100 + ep)
                train_epoch(tl, split_forward(model), model, opt, sched, ep, args,
                            teacher=split_forward(teacher) if teacher is not None else None,
                            max_steps=args.qat_steps, prefix="QAT")
                if is_main():
                    save_qat_checkpoint(ckpt, q, opt, sched, epoch=ep + 1, labels=names)
        m.files["checkpoint"] = ckpt
    with stages.timed("qat_eval"):
        m.score("qat", evaluate(vl, split_forward(q), q, n, "QAT fake-quant"))
    if args.profile and is_main():
        profile_stage(q, vl, args, stages)
    if not args.no_export and is_main():
        export_stage(q, float_split, tok, test, names, args, stages)
    return stages.finish(args.baselines)


def profile_stage(q, vl, args, stages) -> None:
    from suites.common import profiler
    batches = [((ids, attention_bias(mask)), None) for ids, mask, _ in list(vl)[:2]]
    rows = profiler.profile_layers(q, batches, max_batches=2)
    csv_path, png_path = (os.path.join(args.output_dir, f"encoder_profile.{e}") for e in ("csv", "png"))
    profiler.write_csv(rows, csv_path)
    profiler.plot(rows, png_path, title=f"{args.backend}: float vs fake-quant per layer")
    say("=> per-layer float vs fake-quant (worst first)\n" + profiler.format_table(rows, limit=20))
    stages.files.update(profile_csv=csv_path, profile_png=png_path)
    stages.run["profile"] = {"layers": len(rows), "worst_layer": rows[0]["layer"] if rows else None,
                             "worst_sqnr_db": rows[0]["sqnr_db"] if rows else None}


def export_stage(q, float_split, tok, test, names, args, stages) -> None:
    from ts_qat_pytorch.convert_export import convert_export
    m = stages
    base = os.path.join(args.output_dir, "minilm" if args.model is None else "encoder")
    dummy = export_dummy(args)
    with stages.timed("export"):
        r = convert_export(q, dummy, base + "_int8.onnx", opset_version=args.opset_version,
                           qparams_path=base + "_qparams.json", input_names=["input_ids", "attention_bias"],
                           output_names=["logits"], verify=True)
        with torch.no_grad():
            torch.onnx.export(float_split, dummy, base + "_fp32.onnx", input_names=["input_ids", "attention_bias"],
                              output_names=["logits"], opset_version=args.opset_version, dynamo=True,
                              external_data=False)
    kernels = dict(r.integer_kernels)
    m.record_export(r, args.onnx_batch)
    m.files["fp32_onnx"] = base + "_fp32.onnx"
    say(f"=> exported {r.onnx_path}: integer kernels {kernels}, max |ORT - PyTorch| {r.max_abs_diff}")
    with stages.timed("ort_eval"):  # the test texts through the real tokenizer, then the int8 file
        from suites.transformers.evaluate import score_onnx
        m.score("ort", score_onnx(r.onnx_path, tok, test, len(names), args.max_length, args.threads))
    ort = m["scores"]["ort"]
    say(f" * ORT int8 accuracy {ort['accuracy']:.2f} macro-F1 {ort['macro_f1']:.2f}")
    with stages.timed("latency"):
        lat = ort_latency({"fp32_ms": base + "_fp32.onnx", "int8_ms": r.onnx_path}, args.onnx_batch,
                          args.onnx_length, args.threads, args.latency_repeats)
    lat.update(batch=args.onnx_batch, length=args.onnx_length, threads=args.threads or torch.get_num_threads(),
               int8_over_fp32=round(lat["int8_ms"] / lat["fp32_ms"], 3))
    m.extras["ort_latency"] = lat
    say(f"=> ORT latency b{args.onnx_batch} len{args.onnx_length}: fp32 {lat['fp32_ms']} ms, int8 {lat['int8_ms']} ms "
        f"({lat['int8_over_fp32']}x)")

