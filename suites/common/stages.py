"""The runner's stages (suites/common/runner.py calls them in order): the teacher, preparation, the embedded float
fine-tune (cached), float training, evaluation in PyTorch and in onnxruntime, export, profile and sensitivity.
Each stage records its result and wall time in the run's metrics (suites/common/metrics.py)."""
from __future__ import annotations

import copy
import json
import logging
import os

import torch
from torch import nn

from suites.common import distributed as D
from suites.common.checkpoints import atomic_copy, load_float_weights
from suites.common.suite import Suite, SuiteError
from suites.common.training import (EpochSubsetSampler, cosine_schedule, loader, make_optimizer, train_epoch)

logger = logging.getLogger("suites")
say = D.say
EVAL_PREFIX = {"float": "Float", "qat": "QAT"}
EVAL_LABEL = {"float": "float", "qat": "QAT (fake-quant)"}


# ---- teacher and preparation
def choose_teacher(suite: Suite, args) -> str | None:
    """Where the distillation teacher comes from, decided before long work: "path" (--teacher-path), else the
    suite's choice ("float": a copy of the float model the student starts from; "zoo"), None without distillation."""
    if not args.distill_method or args.not_qat or args.evaluate:
        return None
    if args.teacher_path:
        return "path"
    return suite.teacher_source(args)


def build_teacher(suite: Suite, args, student_float: nn.Module) -> nn.Module | None:
    source = getattr(args, "teacher_source", None)
    if not args.distill_method or source is None:
        return None
    if source == "float":
        teacher, arch = copy.deepcopy(student_float), args.arch
    else:
        arch = suite.teacher_arch(args)
        teacher = suite.build_model(args, arch, pretrained=source == "zoo")
        if source == "path":
            load_float_weights(teacher, args.teacher_path, args, "--teacher-path")
    fmt = torch.channels_last if suite.channels_last else torch.contiguous_format
    teacher = teacher.to(args.device, memory_format=fmt).eval()  # forward only: the faster layout
    x = _on(suite.dummy_input(args), args.device)
    was_training = student_float.training
    with torch.no_grad():
        out, want = teacher(*x), student_float.eval()(*x)
    student_float.train(was_training)
    if out.shape[1:] != want.shape[1:]:
        nc = getattr(args, "num_classes", None)
        if nc:
            raise SuiteError(f"teacher {arch} predicts {out.shape[-1]} classes but -nc/--num-classes is {nc}; give "
                             f"--teacher-path with a {nc}-class teacher")
        raise SuiteError(f"teacher {arch} outputs {tuple(out.shape[1:])} per example, the student "
                         f"{tuple(want.shape[1:])}; give --teacher-path with a teacher of the student's outputs")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _on(x, device) -> tuple:
    x = x if isinstance(x, tuple) else (x,)
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in x)


def prepare(suite: Suite, model: nn.Module, args):
    """prepare_by_platform with the backend and bit widths of the flags, laid over the suite's configuration. Below
    8 bits the first and the last conv / linear layer keep --first-last-bit (8) bits, as in the low-bit QAT
    literature: the image and the logits keep their precision."""
    from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
    cfg = copy.deepcopy(suite.prepare_config(model, args) or {})
    if args.backend == "Experimental":
        w, a = args.w_bit or 8, args.a_bit or 8
        cfg.setdefault("extra_qconfig_dict", {}).update({"w_qscheme": {"bit": w}, "a_qscheme": {"bit": a}})
        keep = 8 if args.first_last_bit is None else args.first_last_bit
        if keep and min(w, a) < keep:
            ends = first_last_layers(model)
            cfg.setdefault("module_qconfig", {}).update(
                {n: {"w_qscheme": {"bit": keep}, "a_qscheme": {"bit": keep}} for n in ends})
    return prepare_by_platform(model, BackendType(args.backend), cfg or None)


def first_last_layers(model: nn.Module) -> list[str]:
    """Names of the first and the last conv / linear layer, in module order (execution order for the zoos'
    classifiers)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return list(dict.fromkeys([names[0], names[-1]])) if names else []


# ---- float model
def float_cache_path(suite: Suite, args) -> tuple[str, dict]:
    from suites.common.assets import cache_dir, cache_file
    key = dict(arch=args.arch, float_epochs=args.float_epochs, float_images=args.float_images,
               float_lr=args.float_lr, batch_size=args.batch_size, seed=args.seed, recipe=1, **suite.cache_key(args))
    folder = args.cache_dir or os.path.join(cache_dir(), suite.name)
    return cache_file(folder, f"{args.arch}_{suite.cache_tag}_float", key), key


def float_finetune(suite: Suite, model: nn.Module, train_ds, args, m) -> None:
    """Fine-tune the float model on the embedded data (AdamW one-cycle over --float-epochs x --float-images, rank
    0), or reuse the cached result: the cache is keyed by the recipe."""
    from ts_qat_pytorch.utils.utils import atomic_torch_save, load_checkpoint
    path, key = float_cache_path(suite, args)
    if os.path.exists(path):
        try:
            ck = load_checkpoint(path)
            if ck.get("key") != key:
                raise ValueError("recipe differs")
            model.load_state_dict(ck["state_dict"])
            say(f"=> reusing the fine-tuned float model {path}")
            m.run["float_cached"] = True
            m["times_s"]["float_train"] = 0.0
            return
        except Exception as exc:  # noqa: BLE001 - any problem: train again
            logger.warning("float cache %s unusable (%s); fine-tuning again", path, exc)
    m.run["float_cached"] = False
    with m.timed("float_train"):
        if D.is_main():
            sampler = EpochSubsetSampler(len(train_ds), args.float_images, args.seed + 7)
            dl = loader(train_ds, args.batch_size, args.workers, sampler=sampler, collate_fn=suite.collate)
            steps = len(dl) * args.float_epochs
            opt = torch.optim.AdamW(model.parameters(), lr=args.float_lr, weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.float_lr, total_steps=max(2, steps),
                                                        pct_start=0.15)
            model.to(args.device, memory_format=torch.channels_last if suite.channels_last else
                     torch.contiguous_format)
            for ep in range(args.float_epochs):
                sampler.set_epoch(ep)
                train_epoch(suite, dl, model, opt, sched, ep, args, prefix="Float")
            model.to("cpu", memory_format=torch.contiguous_format)
            atomic_torch_save({"state_dict": model.state_dict(), "key": key}, path)
            say(f"=> fine-tuned float model cached at {path}")
        if args.distributed:
            D.barrier()
            if not D.is_main():
                model.load_state_dict(load_checkpoint(path)["state_dict"])


def train_float(suite: Suite, model: nn.Module, train_ds, val_loader, args, m, paths) -> None:
    """Plain float training with --data --not-qat (pytorch/examples behaviour, cosine per-step LR): the float
    weights after each epoch, and the best epoch's."""
    from ts_qat_pytorch.utils.utils import atomic_torch_save
    world, rank = D.world(), D.rank()
    sampler = EpochSubsetSampler(len(train_ds), args.train_images, args.seed or 0, rank, world)
    dl = loader(train_ds, max(1, args.batch_size // world), args.workers, sampler=sampler, collate_fn=suite.collate)
    mm = model
    if args.distributed:
        mm = nn.parallel.DistributedDataParallel(model, device_ids=[args.device.index]
                                                 if args.device.type == "cuda" else None)
    opt = make_optimizer(model.parameters(), args.optim, args.lr, args.momentum, args.weight_decay)
    sched = cosine_schedule(opt, len(dl) * args.epochs)
    best = None
    for epoch in range(args.start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        with m.timed("float_train"):
            train_epoch(suite, dl, mm, opt, sched, epoch, args)
        if D.is_main():
            value = evaluate_stage(suite, model, val_loader, args, m, "float")
            atomic_torch_save(model.state_dict(), paths["float"])
            m.files["float_checkpoint"] = paths["float"]
            if best is None or suite.metric.better(value, best):
                best = value
                atomic_copy(paths["float"], paths["best_float"])


# ---- evaluation and export
def evaluate_stage(suite: Suite, model: nn.Module, val_loader, args, m, stage: str) -> float:
    """The suite's metric of the PyTorch model (float or fake-quant), recorded and logged; the headline value."""
    with m.timed(f"{stage}_eval"):
        scores = suite.evaluate(model, val_loader, args, EVAL_PREFIX[stage])
    m.score(stage, scores)
    say(f"=> {EVAL_LABEL[stage]} {suite.describe(scores)}")
    return scores[suite.metric.name]


def export_stage(suite: Suite, q, args, m):
    """convert_export of the prepared model: QDQ ONNX + qparams JSON, checked in onnxruntime."""
    from ts_qat_pytorch.convert_export import convert_export
    out = os.path.join(args.out_dir, f"{args.arch}_onnx_quantization.onnx")
    qp = os.path.join(args.out_dir, f"{args.arch}_onnx_quantization_qparams.json")
    dummy = suite.dummy_input(args)
    r = convert_export(getattr(q, "module", q).cpu(), dummy, out, opset_version=args.opset_version,
                       batch_size=args.onnx_batch, qparams_path=qp, **suite.export_options(args))
    getattr(q, "module", q).to(args.device)
    m.record_export(r, args.onnx_batch)
    say(f"=> exported {r.onnx_path} ({r.exporter}, opset {r.opset_version}): "
        f"{r.quantized_layers} quantized layers, integer kernels {r.integer_kernels}, "
        f"max |ORT - PyTorch| {r.max_abs_diff}")
    return r


def ort_stage(suite: Suite, val_loader, args, m) -> None:
    """The exported int8 model in onnxruntime (CPU, all graph optimisations) on the validation set."""
    if args.no_ort_eval:
        return
    from ts_qat_pytorch.onnx.verify import ort_session
    path = m.files["onnx"]
    with m.timed("ort_eval"):
        sess = ort_session(path, threads=torch.get_num_threads())
        scores = suite.evaluate_onnx(sess, val_loader, args, "ORT int8")
    m.score("ort", scores)
    say(f"=> ORT int8 {suite.describe(scores)} ({path})")


# ---- analysis
def profile_stage(suite: Suite, q, calib_loader, args, m) -> None:
    """Per-layer float vs fake-quant on two calibration batches: table (worst first), CSV and PNG."""
    from suites.common import profiler
    batches = ((suite.inputs(b, args.device)[0], None) for b in calib_loader)
    rows = profiler.profile_layers(q, batches, max_batches=2)
    csv_path = os.path.join(args.out_dir, f"{args.arch}_profile.csv")
    png_path = os.path.join(args.out_dir, f"{args.arch}_profile.png")
    profiler.write_csv(rows, csv_path)
    profiler.plot(rows, png_path, title=f"{args.arch} {args.backend}: float vs fake-quant per layer")
    say("=> per-layer float vs fake-quant (worst first)\n" + profiler.format_table(rows, limit=25))
    say(f"=> profile written to {csv_path} and {png_path}")
    m.files.update(profile_csv=csv_path, profile_png=png_path)
    m.run["profile"] = {"layers": len(rows), "worst_layer": rows[0]["layer"] if rows else None,
                        "worst_sqnr_db": rows[0]["sqnr_db"] if rows else None}


def sensitivity_stage(suite: Suite, q, val_loader, args, m, recover: float = 0.8, max_layers: int = 8) -> None:
    """One layer at a time left float, the suite's metric on the validation set (--val-images limits it): the
    ranking, and the fewest float layers that win back most of the loss as prepare_by_platform's exclusions."""
    from suites.common import sensitivity as SE
    sign = 1.0 if suite.metric.direction == "higher" else -1.0  # the helpers maximise

    def evaluate(model) -> float:
        return sign * suite.evaluate(model, val_loader, args, "Sensitivity")[suite.metric.name]

    res = SE.layer_sensitivity(q, evaluate)
    say("=> sensitivity: metric with each layer alone left float\n" + SE.format_ranking(res))
    excl = SE.recovery_exclude_list(q, evaluate, res, recover=recover, max_layers=max_layers)
    base = os.path.join(args.out_dir, f"{args.arch}_")
    cfg = SE.write_exclude_config(excl, base + "exclude.json")
    SE.plot_ranking(res, base + "sensitivity.png")
    from ts_qat_pytorch.utils.utils import atomic_write_bytes
    atomic_write_bytes(base + "sensitivity.json", json.dumps({**res, "exclude": excl}, indent=1).encode())
    say(f"=> leave float {excl['exclude_module_name']}: {suite.metric.name} {sign * excl['metric']:.3f} "
        f"(recovers {100 * excl['recovered_fraction']:.0f}% of the gap); {base}exclude.json: {json.dumps(cfg)}")
    m.files.update(sensitivity=base + "sensitivity.json", exclude=base + "exclude.json")
    m.run["sensitivity"] = {"exclude_module_name": excl["exclude_module_name"], "metric": sign * excl["metric"],
                            "recovered_fraction": excl["recovered_fraction"]}

