"""The runner's stages (suites/common/runner.py calls them in order): the teacher, preparation, the embedded float
fine-tune (cached), float training, evaluation in PyTorch and in onnxruntime, export, profile and sensitivity, and
the accuracy flags' stages (mixed-precision search, PTQ reconstruction, accuracy control's layer ranking).
Each stage records its result and wall time in the run's metrics (suites/common/metrics.py)."""
from __future__ import annotations

import copy
import json
import logging
import os
import time

import torch
from torch import nn

from suites.common import distributed as D
from suites.common.checkpoints import atomic_copy, load_float_weights
from suites.common.history import epoch_row
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
    shapes = [tuple(t.shape[1:]) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    wanted = [tuple(t.shape[1:]) for t in torch.utils._pytree.tree_leaves(want) if isinstance(t, torch.Tensor)]
    if shapes != wanted:  # outputs may be tensors, tuples or dicts (segmentation: {"out": ...})
        out = next(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        nc = getattr(args, "num_classes", None)
        if nc:
            raise SuiteError(f"teacher {arch} predicts {out.shape[-1]} classes but -nc/--num-classes is {nc}; give "
                             f"--teacher-path with a {nc}-class teacher")
        raise SuiteError(f"teacher {arch} outputs {shapes} per example, the student {wanted}; give --teacher-path "
                         "with a teacher of the student's outputs")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _on(x, device) -> tuple:
    x = x if isinstance(x, tuple) else (x,)
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in x)


def prepare(suite: Suite, model: nn.Module, args, changes: dict | None = None):
    """prepare_by_platform with the backend and bit widths of the flags, laid over the suite's configuration (see
    :func:`prepare_config`)."""
    from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
    cfg = prepare_config(suite, model, args, changes)
    return prepare_by_platform(model, BackendType(args.backend), cfg or None)


def prepare_config(suite: Suite, model: nn.Module, args, changes: dict | None = None) -> dict:
    """The suite's prepare_custom_config_dict, --qconfig's extra_qconfig_dict keys, the flags' bit widths (below 8
    bits the first and the last conv / linear layer keep --first-last-bit (8) bits, as in the low-bit QAT
    literature: the image and the logits keep their precision), then the per-layer settings of the run
    (``args.layer_config``: a mixed-precision allocation, accuracy control's changes, or those a --resume checkpoint
    recorded; each layer's entry laid over), then ``changes`` ({layer: bits, or None for float}:
    mix_precision.with_layer_changes)."""
    cfg = copy.deepcopy(suite.prepare_config(model, args) or {})
    user = getattr(args, "qconfig", None) or {}  # --qconfig: laid over the suite's, each scheme key by key
    if user:
        eq = cfg.setdefault("extra_qconfig_dict", {})
        for key, value in copy.deepcopy(user).items():
            eq[key] = {**eq[key], **value} if isinstance(value, dict) and isinstance(eq.get(key), dict) else value
    if args.backend == "Experimental":
        eq = cfg.setdefault("extra_qconfig_dict", {})
        w = args.w_bit or (eq.get("w_qscheme") or {}).get("bit") or 8
        a = args.a_bit or (eq.get("a_qscheme") or {}).get("bit") or 8
        eq.update({"w_qscheme": {**(eq.get("w_qscheme") or {}), "bit": w},
                   "a_qscheme": {**(eq.get("a_qscheme") or {}), "bit": a}})
        keep = 8 if args.first_last_bit is None else args.first_last_bit
        if keep and min(w, a) < keep:
            ends = first_last_layers(model)
            cfg.setdefault("module_qconfig", {}).update(
                {n: {"w_qscheme": {"bit": keep}, "a_qscheme": {"bit": keep}} for n in ends})
    layers = getattr(args, "layer_config", None) or {}
    if layers.get("module_qconfig"):
        mq = cfg.setdefault("module_qconfig", {})
        for name, entry in layers["module_qconfig"].items():
            mq[name] = {**mq.get(name, {}), **copy.deepcopy(entry)}
    excluded = (layers.get("extra_quantizer_dict") or {}).get("exclude_module_name")
    if excluded:
        extra = cfg.setdefault("extra_quantizer_dict", {})
        extra["exclude_module_name"] = list(dict.fromkeys([*extra.get("exclude_module_name", []), *excluded]))
        for name in excluded:
            cfg.get("module_qconfig", {}).pop(name, None)
    if changes:
        from ts_qat_pytorch.mix_precision import with_layer_changes
        cfg = with_layer_changes(cfg, changes)
    return cfg


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


def cached_float(path: str, key: dict) -> dict | None:
    """The cached fine-tuned float model's state_dict when the file holds the recipe ``key``'s; None otherwise."""
    from ts_qat_pytorch.utils.utils import load_checkpoint
    if not os.path.exists(path):
        return None
    try:
        ck = load_checkpoint(path)
        if ck.get("key") != key:
            raise ValueError("recipe differs")
        return ck["state_dict"]
    except Exception as exc:  # noqa: BLE001 - any problem: train again
        logger.warning("float cache %s unusable (%s); fine-tuning again", path, exc)
        return None


def float_finetune(suite: Suite, model: nn.Module, train_ds, args, m) -> None:
    """Fine-tune the float model (``suite.float_finetune``, default :func:`finetune`, rank 0), or reuse the cached
    result: the cache is keyed by the recipe. Rank 0 decides whether the cache is used: a rank that looked for itself
    could find the file rank 0 has just written and skip the barrier the others wait in."""
    from ts_qat_pytorch.utils.utils import atomic_torch_save, load_checkpoint
    path, key = float_cache_path(suite, args)
    state = cached_float(path, key) if D.is_main() else None
    if D.broadcast_object(state is not None):
        model.load_state_dict(state if state is not None else load_checkpoint(path)["state_dict"])
        say(f"=> reusing the fine-tuned float model {path}")
        m.run["float_cached"] = True
        m["times_s"]["float_train"] = 0.0
        return
    m.run["float_cached"] = False
    with m.timed("float_train"):
        if D.is_main():
            model.to(args.device, memory_format=torch.channels_last if suite.channels_last else
                     torch.contiguous_format)
            suite.float_finetune(model, train_ds, args)
            model.to("cpu", memory_format=torch.contiguous_format)
            atomic_torch_save({"state_dict": model.state_dict(), "key": key}, path)
            say(f"=> fine-tuned float model cached at {path}")
        if args.distributed:
            D.barrier()
            if not D.is_main():
                model.load_state_dict(load_checkpoint(path)["state_dict"])


def finetune(suite: Suite, model: nn.Module, train_ds, args) -> None:
    """The default float fine-tune (Suite.float_finetune): AdamW one-cycle over --float-epochs x --float-images."""
    sampler = EpochSubsetSampler(len(train_ds), args.float_images, args.seed + 7)
    dl = loader(train_ds, args.batch_size, args.workers, sampler=sampler, collate_fn=suite.collate)
    steps = len(dl) * args.float_epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.float_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.float_lr, total_steps=max(2, steps),
                                                pct_start=0.15)
    for ep in range(args.float_epochs):
        sampler.set_epoch(ep)
        train_epoch(suite, dl, model, opt, sched, ep, args, prefix="Float")


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
    opt, sched = suite.make_training(model, len(dl), args) or (None, None)
    if opt is None:
        opt = make_optimizer(model.parameters(), args.optim, args.lr, args.momentum, args.weight_decay)
        sched = cosine_schedule(opt, len(dl) * args.epochs)
    best = None
    for epoch in range(args.start_epoch, args.epochs):
        t0 = time.time()
        sampler.set_epoch(epoch)
        with m.timed("float_train"):
            trained = train_epoch(suite, dl, mm, opt, sched, epoch, args)
        if D.is_main():
            value = evaluate_stage(suite, model, val_loader, args, m, "float")
            atomic_torch_save(model.state_dict(), paths["float"])
            m.files["float_checkpoint"] = paths["float"]
            if best is None or suite.metric.better(value, best):
                best = value
                atomic_copy(paths["float"], paths["best_float"])
            m.epoch_done(epoch_row("float", epoch, trained, {suite.metric.name: value}, opt.param_groups[0]["lr"],
                                   time.time() - t0))


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
    suite.after_export(r, args, m)
    return r


def ort_stage(suite: Suite, val_loader, args, m) -> None:
    """The exported int8 model in onnxruntime (CPU, all graph optimisations) on the validation set, then in each
    --deploy target."""
    if not args.no_ort_eval:
        from ts_qat_pytorch.onnx.verify import ort_session
        path = m.files["onnx"]
        with m.timed("ort_eval"):
            sess = ort_session(path, threads=torch.get_num_threads())
            scores = suite.evaluate_onnx(sess, val_loader, args, "ORT int8")
        m.score("ort", scores)
        say(f"=> ORT int8 {suite.describe(scores)} ({path})")
    for target in args.deploy:
        deploy_stage(suite, target, val_loader, args, m)


DEPLOY_LABEL = {"rknn": "RKNN"}


def deploy_stage(suite: Suite, target: str, val_loader, args, m) -> None:
    """The exported file imported by a deployment toolchain (ts_qat_pytorch.deploy) and the suite's metric on the
    validation set as that toolchain runs it: the metrics' ``deploy[target]``, beside QAT and onnxruntime."""
    from ts_qat_pytorch.deploy import DeployError, close_session, open_session
    path = m.files["onnx"]
    label = f"{DEPLOY_LABEL.get(target, target)} {args.deploy_platform}"
    with m.timed(f"deploy_{target}"):
        try:
            sess = open_session(path, target, platform=args.deploy_platform)
        except DeployError as exc:  # recorded with the run's other figures, then the run fails
            m.data["deploy"][target] = {"platform": args.deploy_platform, "error": str(exc)}
            m.write()
            raise SuiteError(str(exc)) from exc
        try:
            say(f"=> {label}: imported and built {os.path.basename(path)} in {sess.build_s:.1f} s (log: "
                f"{sess.log_path})")
            t0 = time.time()
            scores = suite.evaluate_onnx(sess, val_loader, args, label)
        finally:
            close_session(sess)
    m.record_deploy(target, scores, platform=args.deploy_platform, build_s=round(sess.build_s, 2),
                    eval_s=round(time.time() - t0, 2), file_bytes=os.path.getsize(path),
                    toolkit_version=getattr(sess, "toolkit_version", None), log=sess.log_path)
    rec = m["deploy"][target]
    gaps = ", ".join(f"{v:+.{suite.digits}f} vs {k[6:].upper()}" for k, v in rec.items() if k.startswith("minus_"))
    say(f"=> {label} {suite.describe(scores)}{f' ({gaps})' if gaps else ''}")


# ---- analysis
def profile_stage(suite: Suite, q, calib_loader, args, m) -> None:
    """Per-layer float vs fake-quant on two calibration batches: table (worst first), CSV and PNG."""
    from ts_qat_pytorch.analysis import profile as profiler
    batches = ((suite.inputs(b, args.device)[0], None) for b in calib_loader)
    rows = profiler.profile_layers(q, batches, max_batches=2)
    csv_path = os.path.join(args.out_dir, f"{args.arch}_profile.csv")
    png_path = os.path.join(args.out_dir, f"{args.arch}_profile.png")
    profiler.write_profile_csv(rows, csv_path)
    profiler.plot_profile(rows, png_path, title=f"{args.arch} {args.backend}: float vs fake-quant per layer")
    say("=> per-layer float vs fake-quant (worst first)\n" + profiler.format_profile(rows, limit=25))
    say(f"=> profile written to {csv_path} and {png_path}")
    m.files.update(profile_csv=csv_path, profile_png=png_path)
    m.run["profile"] = {"layers": len(rows), "worst_layer": rows[0]["layer"] if rows else None,
                        "worst_sqnr_db": rows[0]["sqnr_db"] if rows else None}


def sensitivity_stage(suite: Suite, q, val_loader, args, m, recover: float = 0.8, max_layers: int = 8) -> None:
    """One layer at a time left float, the suite's metric on the validation set (--val-images limits it): the
    ranking, and the fewest float layers that win back most of the loss as prepare_by_platform's exclusions."""
    from ts_qat_pytorch.analysis import fallback as SE
    sign = 1.0 if suite.metric.direction == "higher" else -1.0  # the helpers maximise

    def evaluate(model) -> float:
        return sign * suite.evaluate(model, val_loader, args, "Sensitivity")[suite.metric.name]

    res = SE.float_fallback_ranking(q, evaluate)
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



# ---- accuracy beyond plain QAT: mixed precision, PTQ reconstruction, the layer ranking of accuracy control
def _as_batch(q, inputs: tuple):
    """A suite's model inputs as a batch the core's reconstruction feeds: the tensor, or (several inputs) a dict of
    the traced model's input names."""
    if len(inputs) == 1:
        return inputs[0]
    names = [n.target for n in q.graph.nodes if n.op == "placeholder"]
    return dict(zip(names, inputs))


def _search_fns(suite: Suite, args):
    """forward(model, batch) and loss_fn(output, batch, float output) of the core's sensitivity: the suite's inputs
    and the suite's training loss."""
    def forward(model, batch):
        return model(*suite.inputs(batch, args.device)[0])

    def loss_fn(output, batch, float_output):
        return suite.loss(output, suite.inputs(batch, args.device)[1])
    return forward, loss_fn


def _first_batches(loader_, n: int) -> list:
    out = []
    for b in loader_:
        out.append(b)
        if len(out) >= n:
            break
    return out


def mixed_precision_costs(suite: Suite, model: nn.Module, args) -> dict:
    """Each quantized layer's weights and MACs per sample (one forward of the suite's dummy input), and the budget
    checked against what --candidates can reach: an error before the float stage and the search."""
    from ts_qat_pytorch.mix_precision import budget_range, layer_costs
    q = prepare(suite, model, args)
    costs = layer_costs(q, _on(suite.dummy_input(args), next(q.parameters()).device), forward=lambda mm, x: mm(*x))
    if not costs:
        raise SuiteError("--mixed-precision: the prepared model has no quantized layers")
    acts = args.act_candidates or [args.a_bit or 8]
    (key, value), = args.budget.items()
    lo, hi = budget_range(costs, args.budget, args.candidates, acts)
    flag, unit = {"avg_bits": ("--avg-bits", 1), "size_bits": ("--size-kib", 8192), "bops": ("--bops", 1)}[key]
    if value < lo * (1 - 1e-9):
        raise SuiteError(f"{flag} {value / unit:g} cannot be met: with --candidates "
                         f"{' '.join(map(str, args.candidates))} the {len(costs)} quantized layers need at least "
                         f"{lo / unit:g} (at most {hi / unit:g}); raise the budget or add a smaller candidate")
    return costs


def mixed_precision_stage(suite: Suite, model: nn.Module, calib_loader, costs: dict, args, m):
    """The sensitivity search on the float model (--mp-batches calibration batches), the bit allocation under the
    budget, its files (<arch>_mixed_precision/: mixed_precision.json, layers.csv, bits_vs_sensitivity.png, written by
    tools/mixed_precision.py's writers) and records; sets ``args.layer_config`` (the allocation's module_qconfig) and
    ``args.backend``. Returns the Sensitivity (accuracy control ranks layers with it). Rank 0 searches, the other
    ranks receive the result."""
    import time

    from ts_qat_pytorch.mix_precision import allocate_bits, layer_sensitivity
    result = None
    if D.is_main():
        with m.timed("mixed_precision"):
            t0 = time.time()
            q = prepare(suite, model, args)
            forward, loss_fn = _search_fns(suite, args)
            batches = _first_batches(calib_loader, args.mp_batches)
            say(f"=> mixed precision: {args.sensitivity_method} sensitivity of {len(costs)} layers at bits "
                f"{args.candidates}{f', activations at {args.act_candidates}' if args.act_candidates else ''} on "
                f"{len(batches)} calibration batches, budget {args.budget}")
            sens = layer_sensitivity(q, batches, args.candidates, args.sensitivity_method, loss_fn=loss_fn,
                                     n_samples=args.mp_samples, blockwise=args.mp_blockwise,
                                     act_candidates=args.act_candidates or (), forward=forward)
            del q
            try:
                alloc = allocate_bits(sens, costs, args.budget, act_bits=args.a_bit or 8)
            except ValueError as exc:
                raise SuiteError(f"--mixed-precision: {exc}") from None
            from ts_qat_pytorch.mix_precision import report
            folder = os.path.join(args.out_dir, f"{args.arch}_mixed_precision")
            report.write_outputs(folder, alloc, sens)
            say("=> mixed precision allocation\n" + report.table(alloc))
            result = (sens, alloc.module_qconfig, alloc.backend)
            record = {"budget": alloc.budget, "achieved": alloc.achieved, "method": sens.method,
                      "candidates": list(sens.candidates), "act_candidates": list(sens.act_candidates) or None,
                      "a_bit": args.a_bit or 8, "backend": None, "w_bits": alloc.w_bits, "a_bits": alloc.a_bits,
                      "objective": alloc.objective, "batches": len(batches), "samples": args.mp_samples,
                      "blockwise": args.mp_blockwise, "seconds": round(time.time() - t0, 2)}
            m.files.update(mixed_precision=os.path.join(folder, "mixed_precision.json"),
                           mixed_precision_csv=os.path.join(folder, "layers.csv"),
                           mixed_precision_png=os.path.join(folder, "bits_vs_sensitivity.png"))
    result = D.broadcast_object(result)
    sens, module_qconfig, backend = result
    if backend == "TSQAT" and (args.a_bit or 8) < 8:
        backend = "Experimental"
    args.backend, args.layer_config = backend, {"module_qconfig": module_qconfig}
    m.data["backend"] = backend
    if D.is_main():
        m.extras["mixed_precision"] = {**record, "backend": backend}
        say(f"=> mixed precision: backend {backend}, config {m.files['mixed_precision']}")
    return sens


def ptq_batches(suite: Suite, q, calib_loader, args) -> tuple[list, int]:
    """(the first --ptq-images calibration images as batches the core's PTQ steps feed, their count)."""
    batches, n = [], 0
    for b in calib_loader:
        inputs = suite.inputs(b, torch.device("cpu"))[0]
        batches.append(_as_batch(q, inputs))
        n += int(inputs[0].shape[0]) if isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 1
        if n >= args.ptq_images:
            break
    return batches, n


def reconstruct(suite: Suite, q, calib_loader, args, float_model=None):
    """ts_qat_pytorch.advanced_ptq.ptq_reconstruction of the calibrated model (in place) on the first --ptq-images
    calibration images, with ``args.ptq_config``; seeded, so every rank of a distributed run fits the same.
    ``float_model``: the float reference after --bias-correction (the model before the correction)."""
    from suites.common.training import seed_everything
    from ts_qat_pytorch.advanced_ptq import ptq_reconstruction
    batches, n = ptq_batches(suite, q, calib_loader, args)
    seed_everything((args.seed or 0) + 17)
    say(f"=> PTQ reconstruction on {n} calibration images ({len(batches)} batches): {json.dumps(args.ptq_config)}")
    return ptq_reconstruction(getattr(q, "module", q), batches, args.ptq_config, float_model=float_model)


def ptq_stage(suite: Suite, q, calib_loader, val_loader, args, m, float_model=None, before: dict | None = None
              ) -> dict | None:
    """--ptq-recon after calibration (and --bias-correction: its float reference ``float_model`` and its corrected
    model's scores ``before``): the calibrated (min/max, round-to-nearest) model's metric, the reconstruction (the
    core logs each block), the reconstructed model's metric; recorded under the metrics' extras "ptq". Returns the
    reconstructed model's scores (rank 0; None elsewhere)."""
    import time
    rec = {"config": dict(args.ptq_config)}
    before = evaluate_calibrated(suite, q, val_loader, args, m, rec, before)
    t0 = time.time()
    with m.timed("ptq_recon"):
        report = reconstruct(suite, q, calib_loader, args, float_model)
    rec["seconds"] = round(time.time() - t0, 2)
    units = report.units
    say("=> PTQ reconstruction per unit (output MSE against float)\n" + report.table())
    rec.update(units=len(units), images=args.ptq_images,
               loss_before=sum(u.loss_before for u in units), loss_after=sum(u.loss_after for u in units),
               reverted=[u.name for u in units if u.reverted],
               per_unit=[{"name": u.name, "layers": len(u.layers), "loss_before": u.loss_before,
                          "loss_after": u.loss_after, "seconds": round(u.seconds, 2)} for u in units])
    return evaluate_ptq_step(suite, q, val_loader, args, m, "reconstructed", before, rec, "ptq")


def evaluate_calibrated(suite: Suite, q, val_loader, args, m, rec: dict, before: dict | None = None):
    """The calibrated (min/max, round-to-nearest) model's scores before a post-training step (rank 0; None
    elsewhere): ``before`` when already measured, else evaluated; recorded in ``rec`` as ``calibrated``."""
    if not D.is_main():
        return None
    if before is None:
        with m.timed("ptq_eval"):
            before = suite.evaluate(q, val_loader, args, "PTQ calibrated")
        say(f"=> PTQ calibrated (min/max, round-to-nearest) {suite.describe(before)}")
    rec.update(calibrated=before[suite.metric.name], calibrated_scores=before)
    return before


def evaluate_ptq_step(suite: Suite, q, val_loader, args, m, step: str, before: dict, rec: dict, key: str):
    """The metric after a post-training step (rank 0; None elsewhere), logged as "PTQ <step>" against the calibrated
    model's and recorded in ``rec`` as the metrics' extras[key]: ``<field>``, ``<field>_scores`` and
    ``<field>_minus_calibrated``, the field being the step's last word ("bias-corrected": "corrected")."""
    if not D.is_main():
        return None
    name, field = suite.metric.name, step.rsplit("-", 1)[-1]
    with m.timed("ptq_eval"):
        after = suite.evaluate(q, val_loader, args, f"PTQ {step}")
    d = suite.metric.format(after[name] - before[name])
    say(f"=> PTQ {step} {suite.describe(after)} (calibrated {suite.metric.format(before[name])}, {d})")
    rec.update({field: after[name], f"{field}_scores": after,
                f"{field}_minus_calibrated": round(after[name] - before[name], suite.digits)})
    m.extras[key] = rec
    return after


def layer_bits(q, cfg: dict) -> dict[str, tuple[int, int]]:
    """Each quantized layer's (weight bits, activation bits) in the prepared model ``q`` made from ``cfg`` (its
    prepare_custom_config_dict)."""
    from ts_qat_pytorch.mix_precision import quantized_layers
    a_all = ((cfg.get("extra_qconfig_dict") or {}).get("a_qscheme") or {}).get("bit", 8)
    mq = cfg.get("module_qconfig") or {}
    q = getattr(q, "module", q)
    return {n: (int(q.get_submodule(n).weight_fake_quant.scheme.bit),
                int((mq.get(n, {}).get("a_qscheme") or {}).get("bit", a_all))) for n in quantized_layers(q)}


def layer_ranking(suite: Suite, float_model: nn.Module, bits: dict, calib_loader, args, sens=None
                  ) -> dict[str, float]:
    """{layer: sensitivity at its bits} for accuracy control, most sensitive first: the mixed-precision search's
    Sensitivity when there was one, else a search (--sensitivity-method, --mp-batches) at the bits each layer has
    (weights, plus the measured loss increase of its input at its activation bits). Rank 0 ranks."""
    from ts_qat_pytorch.mix_precision import layer_sensitivity
    ranking = None
    if D.is_main():
        w_cands = sorted({w for w, _ in bits.values()})
        a_cands = sorted({a for _, a in bits.values()})
        have = sens is not None and all(w in sens.candidates for w, _ in bits.values())
        if not have:
            say(f"=> accuracy control: {args.sensitivity_method} sensitivity of {len(bits)} layers at their bits")
            forward, loss_fn = _search_fns(suite, args)
            sens = layer_sensitivity(prepare(suite, float_model, args), _first_batches(calib_loader, args.mp_batches),
                                     w_cands, args.sensitivity_method, loss_fn=loss_fn, n_samples=args.mp_samples,
                                     blockwise=args.mp_blockwise, act_candidates=a_cands, forward=forward)
        scores = {}
        for n, (w, a) in bits.items():
            if n not in sens.weight:
                continue
            scores[n] = sens.weight[n][w] + (sens.activation.get(n, {}).get(a, 0.0) if sens.activation else 0.0)
        ranking = dict(sorted(scores.items(), key=lambda kv: -kv[1]))
    return D.broadcast_object(ranking)
