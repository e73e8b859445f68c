"""The one pipeline of every suite, read top to bottom in :func:`run`:

    checks before long work -> data -> float model (fine-tune, cached) -> float eval -> teacher -> [--cle,
    --smoothquant: float processing] -> [--mixed-precision: sensitivity search, bit allocation] -> prepare ->
    calibration -> [--bias-correction] -> [--ptq-recon: PTQ reconstruction] -> QAT epochs (distillation; each
    epoch: eval, atomic checkpoints, export; --epochs 0: the PTQ model saved and exported instead) -> [--max-drop:
    accuracy control] -> replica check -> profile / sensitivity -> onnxruntime eval -> metrics JSON -> baselines

A suite (suites/common/suite.py) provides its model, data, metric and recipe; its main.py is

    sys.exit(runner.main(MySuite()))

:func:`main` parses the flags, picks the devices (``--device``, ``--gpu``; neither: one, the first GPU, else the CPU)
and starts the processes: one, one per GPU when several are named (DistributedDataParallel), torchrun's, or
``--multiprocessing-distributed``'s.
Outputs go to ``<output-dir>/<suite>/`` under the manual's names (``<arch>_checkpoint.pth`` ...); only rank 0
logs and writes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

from suites.common import checkpoints as C
from suites.common import distributed as D
from suites.common import post_training as P
from suites.common import stages as S
from suites.common.cli import build_parser, resolve, set_log_level, threads
from suites.common.devices import describe, select_devices
from suites.common.history import EpochHistory, epoch_row
from suites.common.metrics import RunMetrics
from suites.common.suite import Suite, SuiteError
from suites.common.training import (EpochSubsetSampler, cosine_schedule, loader, make_optimizer, qat_param_groups,
                                    report_skips, seed_everything, set_rng_state, skipped_images, train_epoch)
from ts_qat_pytorch.utils.calibrate import calibrate
from ts_qat_pytorch.utils.state import freeze_bn_stats

logger = logging.getLogger("suites")
say = D.say


def main(suite: Suite, argv=None) -> int:
    args = build_parser(suite).parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    set_log_level(args.log_level, suite.name)
    if threads(args) > 0:
        torch.set_num_threads(threads(args))
    bad_input = (SuiteError, *suite.errors)
    try:
        torchrun = D.under_torchrun(args)
        # first of all: --device 1,2 becomes CUDA_VISIBLE_DEVICES, which only counts before CUDA starts
        devices = select_devices(args.device, args.gpu, every=torchrun)
        args = resolve(suite, args)
        if args.seed is not None and not args.embedded:
            warnings.warn("You have chosen to seed training. This will turn on the CUDNN deterministic setting, "
                          "which can slow down your training considerably!")
        if args.dist_url == "env://" and args.world_size == -1:
            args.world_size = int(os.environ.get("WORLD_SIZE", -1))
        spawn = args.multiprocessing_distributed or (len(devices) > 1 and not torchrun)
        args.distributed = args.world_size > 1 or spawn
        if spawn:
            nproc = len(devices) if devices[0].type == "cuda" else 2
            args.multiprocessing_distributed = True
            args.world_size = nproc * max(1, args.world_size)
            import torch.multiprocessing as mp
            try:
                mp.spawn(_spawned, nprocs=nproc, args=(suite, nproc, devices, args))
            except mp.ProcessExitedException as exc:
                return exc.exit_code or 1
            return 0
        local = int(os.environ.get("LOCAL_RANK", 0)) if torchrun else 0
        return worker(local, suite, 1, devices, args)
    except bad_input as exc:
        print(f"error: {error_message(exc)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the last complete checkpoints in {getattr(args, 'out_dir', args.output_dir)} are intact "
              "(writes are atomic)", file=sys.stderr, flush=True)
        return 130


def _spawned(local: int, suite: Suite, nproc: int, devices, args) -> None:
    rc = worker(local, suite, nproc, devices, args)
    if rc:
        sys.exit(rc)  # mp.spawn reports it to main(), which returns it


def worker(local: int, suite: Suite, nproc: int, devices, args) -> int:
    """One process: its device, the process group, the pipeline."""
    if devices[0].type == "cuda" and local >= len(devices):
        raise SuiteError(f"process {local} of this node has no GPU: --device names {describe(devices)}; start as many "
                         "processes per node as GPUs (torchrun --nproc_per_node)")
    args.device = devices[local] if devices[0].type == "cuda" else devices[0]
    if args.device.type == "cuda":
        torch.cuda.set_device(args.device)
    set_log_level(args.log_level, suite.name)
    if threads(args) > 0:
        torch.set_num_threads(threads(args))
    if args.distributed:
        D.init_process(args, local, nproc)
        # rank 0's output folder: a suite's choice may look at the disk (yolov5's exp, exp2 ...), which another rank
        # may have changed meanwhile
        args.out_dir, args.metrics = D.broadcast_object((args.out_dir, args.metrics))
    try:
        return run(suite, args)
    except (SuiteError, *suite.errors) as exc:
        print(f"error: {error_message(exc)}", file=sys.stderr, flush=True)
        return 2
    finally:
        if args.distributed and dist.is_initialized():
            dist.destroy_process_group()


def error_message(exc: BaseException) -> str:
    """The error's own text; one raised in a DataLoader worker arrives wrapped with the worker's traceback, of
    which the last line is the error itself."""
    msg = str(exc)
    if "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg


def run(suite: Suite, args) -> int:
    qat = not args.not_qat
    m = RunMetrics(args.metrics, suite.name, args.arch, args.backend if qat else None, suite.metric,
                   digits=suite.digits, entry=f"suites/{suite.name}/{suite.script}", argv=args.argv)
    if args.seed is not None:
        seed_everything(args.seed)
        torch.backends.cudnn.deterministic = True
    world, rank = D.world(), D.rank()

    # ---- everything cheap is checked before long work
    suite.check(args)
    if qat and not args.embedded and not (args.pretrained or args.model_path or args.resume):
        raise SuiteError("QAT fine-tunes a trained model: give one of --pretrained, --model-path or --resume "
                         "(or --not-qat to train a float model from scratch)")
    if args.resume and not qat:
        raise SuiteError("--resume restores QAT checkpoints; with --not-qat use --model-path")
    for flag, path in (("--model-path", args.model_path), ("--teacher-path", args.teacher_path)):
        if path:
            C.read_state_dict(path, flag)  # readable, a state_dict
    if args.resume:
        C.check_resume(args)
        resumed_layers(args, m)
    if args.deploy:
        from ts_qat_pytorch.deploy import DeployError, find_python
        if args.no_export:
            raise SuiteError("--deploy imports the exported file: drop --no-export")
        try:
            find_python()
        except DeployError as exc:
            raise SuiteError(str(exc)) from exc
    args.teacher_source = S.choose_teacher(suite, args)  # a teacher that cannot be used is refused here
    data = suite.datasets(args)
    os.makedirs(args.out_dir, exist_ok=True)
    paths = C.output_paths(args)
    m.run.update(embedded=args.embedded, dataset=data.name, world_size=world, devices=describe([args.device]),
                 batch_size=args.batch_size, val_images=len(data.val), seed=args.seed)
    m.extras.update(suite.extras(args, data))

    # ---- the float model: built, fine-tuned on the embedded data (cached), evaluated
    model = suite.build_model(args, args.arch, pretrained=args.pretrained or (
        args.embedded and not args.model_path and suite.embedded_weights(args)))
    if args.model_path:
        C.load_float_weights(model, args.model_path, args, "--model-path")
        say(f"=> loaded float weights '{args.model_path}'")
    P.check_float_tools(suite, model, args)  # --cle / --smoothquant find what they work on, before long work
    search = qat and args.mixed_precision and not getattr(args, "layer_config", None)
    costs = S.mixed_precision_costs(suite, model, args) if search else None  # the budget, before long work
    per_rank_batch = max(1, args.batch_size // world)
    val_loader = loader(data.val, max(per_rank_batch, args.val_batch_size or per_rank_batch), args.workers,
                        collate_fn=suite.collate)
    finetuned = suite.finetunes_float(args)
    if finetuned:
        S.float_finetune(suite, model, data.train, args, m)
    model.to(args.device, memory_format=torch.channels_last if suite.channels_last else torch.contiguous_format)
    control = qat and args.max_drop is not None and not args.evaluate
    # the float model's metric: what QAT is measured against (the metrics' qat_minus_float), and -e --not-qat's result
    if args.embedded or finetuned or control or (args.evaluate and not qat) or (qat and not args.resume
                                                                                and not args.evaluate):
        if D.is_main():
            S.evaluate_stage(suite, model, val_loader, args, m, "float")
    if not qat:
        if not args.embedded and not args.evaluate and not finetuned:
            m.history = EpochHistory(paths["results_csv"], paths["results_png"], suite.metric.name,
                                     keep_before=args.start_epoch)
            S.train_float(suite, model, data.train, val_loader, args, m, paths)
        return finish(args, m, data)

    # ---- QAT: teacher (checked before long work), mixed precision, prepare, calibrate + reconstruct (unless resuming)
    model.to(memory_format=torch.contiguous_format)  # the traced QAT model gains nothing from channels_last
    teacher = S.build_teacher(suite, args, model) if not args.evaluate else None
    calib_loader = loader(data.calib, per_rank_batch, args.workers, collate_fn=suite.collate,
                          sampler=EpochSubsetSampler(len(data.calib), args.calib_batches * per_rank_batch,
                                                     (args.seed or 0) + 13))
    model = P.float_tools_stage(suite, model, calib_loader, val_loader, args, m)  # --cle, --smoothquant
    sens = S.mixed_precision_stage(suite, model, calib_loader, costs, args, m) if search else None
    q = S.prepare(suite, model, args).to(args.device)
    ptq_scores = None
    if not args.resume:
        calibrate_stage(suite, q, data, calib_loader, args, m)
        float_ref = None  # after --bias-correction the quantizers-off model is no longer the float one
        if args.bias_correction:
            ptq_scores, float_ref = P.bias_correction_stage(suite, q, calib_loader, val_loader, args, m)
        if args.ptq_recon:
            ptq_scores = S.ptq_stage(suite, q, calib_loader, val_loader, args, m, float_ref, ptq_scores)
        del float_ref
    elif args.ptq_recon or args.bias_correction:
        say("=> --ptq-recon / --bias-correction: not with --resume (the checkpoint is past calibration)")
    if args.max_drop is not None and args.evaluate:
        say("=> --max-drop: not with -e (evaluates what was given)")
    float_model = model if control else None
    del model

    # ---- QAT training set-up: loader, optimizer, LR schedule; or the state of --resume
    train_sampler = EpochSubsetSampler(len(data.train), args.train_images, args.seed or 0, rank, world)
    train_loader = loader(data.train, per_rank_batch, args.workers, sampler=train_sampler, collate_fn=suite.collate)
    steps_per_epoch = len(train_loader)
    optimizer, scheduler = make_training(suite, q, steps_per_epoch, args)
    best, start_epoch = None, args.start_epoch
    if args.resume:
        ck = C.restore(q, optimizer, scheduler, args)
        # rank 0's epoch and best: the ranks run the same epochs and agree on the best one
        start_epoch, best = D.broadcast_object((int(ck.get("epoch", 0)), ck.get("best_metric", ck.get("best_acc1"))))
        set_rng_state(ck.get("rng", {}))
        say(f"=> resumed '{args.resume}' at epoch {start_epoch} (best {suite.metric.name} "
            f"{suite.metric.format(best)})")
    if not args.resume and args.seed is not None:
        seed_everything(args.seed + 1 + rank)  # QAT's randomness does not depend on whether the float stage ran
    scaler = torch.amp.GradScaler("cuda") if args.amp and args.device.type == "cuda" else None

    if args.evaluate:  # -e: evaluate, analyse and export what was given (--resume, or the calibrated model)
        if D.is_main():
            S.evaluate_stage(suite, q, val_loader, args, m, "qat")
        analyse(suite, q, calib_loader, val_loader, args, m)
        if D.is_main() and not args.no_export:
            with m.timed("export"):
                S.export_stage(suite, q, args, m)
            S.ort_stage(suite, val_loader, args, m)
        return finish(args, m, data)

    # ---- QAT epochs: train, evaluate (rank 0), checkpoint + export (rank 0)
    last_epoch = args.epochs
    if args.stop_after_epochs is not None:
        last_epoch = min(args.epochs, start_epoch + args.stop_after_epochs)
    qat_setup = dict(teacher=teacher, train_loader=train_loader, train_sampler=train_sampler, scaler=scaler)
    m.history = EpochHistory(paths["results_csv"], paths["results_png"], suite.metric.name,
                             keep_before=start_epoch if args.resume else 0)  # a resumed run's rows continue the file
    value, best = qat_epochs(suite, q, optimizer, scheduler, start_epoch, last_epoch, best, val_loader, args, m,
                             paths, **qat_setup)
    if value is None and not args.resume:  # --epochs 0: calibration (and --ptq-recon) only; saved like an epoch
        done = "reconstructed" if args.ptq_recon else "bias-corrected" if args.bias_correction else "calibrated"
        say(f"=> no QAT (--epochs {args.epochs}): the {done} model is the result")
        if D.is_main():
            value = record_qat(suite, q, ptq_scores, val_loader, args, m)
            C.save_all(suite, q, optimizer, scheduler, start_epoch, value, True, paths, args, m)
        value = best = D.broadcast_float(value if value is not None else 0.0)
    elif value is None:
        say(f"=> nothing to train: start epoch {start_epoch} >= --epochs {args.epochs}")
        if D.is_main():
            value = S.evaluate_stage(suite, q, val_loader, args, m, "qat")
            if not args.no_export:
                with m.timed("export"):
                    S.export_stage(suite, q, args, m)
        value = D.broadcast_float(value if value is not None else 0.0)
    if control and last_epoch < args.epochs:
        say(f"=> --max-drop: after the last epoch (--stop-after-epochs stopped at {last_epoch} of {args.epochs})")
    elif control:
        q, value, best = accuracy_control(suite, q, value, best, float_model, sens, calib_loader, val_loader, data,
                                          steps_per_epoch, args, m, paths, qat_setup)
    if args.distributed:
        m.run.update(D.replica_check(q))
    analyse(suite, q, calib_loader, val_loader, args, m)
    if D.is_main() and m.files.get("onnx"):
        S.ort_stage(suite, val_loader, args, m)
    m.run["best"] = best
    return finish(args, m, data)


def resumed_layers(args, m: RunMetrics) -> None:
    """A --resume checkpoint that records per-layer quantization (mixed precision, accuracy control): the model is
    prepared the same way (its backend and layer settings; the search is not run again)."""
    ck = C.read_checkpoint(args.resume, "--resume") if D.is_main() else None
    rec = D.broadcast_object(ck.get("layer_config") if isinstance(ck, dict) else None)  # every rank prepares alike
    if not rec:
        return
    args.layer_config, args.backend = rec["prepare"], rec["backend"]
    m.data["backend"] = args.backend
    m.extras["layer_config"] = {"backend": args.backend, **rec["prepare"], "from": args.resume}
    say(f"=> --resume: the checkpoint's per-layer quantization ({len(rec['prepare'].get('module_qconfig') or {})} "
        f"layer settings, backend {args.backend}){' instead of a new search' if args.mixed_precision else ''}")


def calibrate_stage(suite: Suite, q, data, calib_loader, args, m: RunMetrics | None) -> None:
    with (m.timed("calibration") if m is not None else contextlib.nullcontext()):
        before = skipped_images(data.calib)
        calibrate(q, calib_loader, forward=lambda model_, batch: model_(*suite.inputs(batch, args.device)[0]))
        report_skips(data.calib, before, "Calibration")
        suite.after_calibration(q, args, m)
    say(f"=> calibrated on {len(calib_loader.sampler)} images ({len(calib_loader)} batches)")


def make_training(suite: Suite, q, steps_per_epoch: int, args):
    """The QAT (optimizer, LR scheduler): the suite's (Suite.make_training), else --optim / --lr / --wd (the
    quantizers' scales at --qparam-lr) with --warmup-steps of linear warm-up and a per-step cosine to 0."""
    made = suite.make_training(q, steps_per_epoch, args)
    if made is not None:
        return made
    optimizer = make_optimizer(qat_param_groups(q, args.lr, args.qparam_lr), args.optim, args.lr, args.momentum,
                               args.weight_decay)
    return optimizer, cosine_schedule(optimizer, steps_per_epoch * args.epochs, args.warmup_steps)


def record_qat(suite: Suite, q, scores, val_loader, args, m: RunMetrics) -> float:
    """The fake-quant model's metric as the run's "qat" (rank 0): ``scores`` already measured, else evaluated."""
    if scores is None:
        return S.evaluate_stage(suite, q, val_loader, args, m, "qat")
    m.score("qat", scores)
    say(f"=> {S.EVAL_LABEL['qat']} {suite.describe(scores)}")
    return scores[suite.metric.name]


def qat_epochs(suite: Suite, q, optimizer, scheduler, start_epoch: int, last_epoch: int, best, val_loader, args,
               m: RunMetrics, paths: dict | None, teacher, train_loader, train_sampler, scaler):
    """QAT epochs: train; with ``paths``, after each epoch evaluate (rank 0), checkpoint and export (rank 0).
    Without ``paths`` (accuracy control's rebuilds) train only. Returns (the last epoch's metric or None, best)."""
    world = D.world()
    qm = q
    if args.distributed:
        qm = nn.parallel.DistributedDataParallel(q, device_ids=[args.device.index] if args.device.type == "cuda"
                                                 else None)
    steps_per_epoch = len(train_loader)
    value = None
    for epoch in range(start_epoch, last_epoch):
        t0 = time.time()
        train_sampler.set_epoch(epoch)
        if args.freeze_bn_epoch is not None and epoch >= args.freeze_bn_epoch:
            freeze_bn_stats(q)
        with (m.timed("qat_train") if paths is not None else contextlib.nullcontext()):
            train_scores, train_loss = train_epoch(suite, train_loader, qm, optimizer, scheduler, epoch, args,
                                                   teacher=teacher, scaler=scaler)
        if paths is None:
            continue
        m.run.update(qat_train_loss=train_loss, qat_train_scores=train_scores,
                     qat_steps=steps_per_epoch * (epoch + 1), qat_images_per_epoch=len(train_sampler) * world)
        value = S.evaluate_stage(suite, q, val_loader, args, m, "qat") if D.is_main() else 0.0
        value = D.broadcast_float(value)
        is_best = best is None or suite.metric.better(value, best)
        best = value if is_best else best
        if D.is_main():
            C.save_all(suite, q, optimizer, scheduler, epoch + 1, best, is_best, paths, args, m)
            m.epoch_done(epoch_row("qat", epoch, (train_scores, train_loss), {suite.metric.name: value},
                                   optimizer.param_groups[0]["lr"], time.time() - t0))
        D.barrier()
    return value, best


def accuracy_control(suite: Suite, q, value: float, best, float_model, sens, calib_loader, val_loader, data,
                     steps_per_epoch: int, args, m: RunMetrics, paths: dict, qat_setup: dict):
    """--max-drop: when the run's model is more than --max-drop worse than float, mix_precision.accuracy_controlled
    raises the most sensitive layers to 8 bits (or leaves them float), fewest first, each try redoing what the run did
    (prepare, calibrate, --ptq-recon, the QAT epochs), until within --max-drop or --max-drop-layers. The best model is
    saved and exported (the layers it changed are recorded in its checkpoint, so --resume prepares it the same way)
    and recorded under the metrics' extras "accuracy_control". Returns (model, its metric, best)."""
    import time

    from ts_qat_pytorch.mix_precision import accuracy_controlled, with_layer_changes
    t0 = time.time()
    higher = suite.metric.direction == "higher"
    float_value = D.broadcast_float(m["float"] if D.is_main() else 0.0)
    drop = (float_value - value) if higher else (value - float_value)
    rec = {"max_drop": args.max_drop, "float": float_value, "metric_before": value,
           "drop_before": round(drop, suite.digits), "max_layers": args.max_drop_layers}
    fmt = suite.metric.format
    if drop <= args.max_drop:
        say(f"=> accuracy control: {suite.metric.name} {fmt(value)} is {fmt(drop)} from float {fmt(float_value)}, "
            f"within --max-drop {args.max_drop:g}: no layer changed")
        m.extras["accuracy_control"] = {**rec, "metric": value, "drop": rec["drop_before"], "within_budget": True,
                                        "changes": {}, "action": None, "tries": [], "seconds": 0.0}
        return q, value, best
    cfg = S.prepare_config(suite, float_model, args)
    bits_now = S.layer_bits(q, cfg)
    low = {n: b for n, b in bits_now.items() if min(b) < 8}
    to_bits = None if (args.max_drop_float or not low) else 8
    action = "float" if to_bits is None else "8-bit"
    verb = "left float" if to_bits is None else "raised to 8 bits"
    say(f"=> accuracy control: {suite.metric.name} {fmt(value)} is {fmt(drop)} from float {fmt(float_value)}, more "
        f"than --max-drop {args.max_drop:g}: the most sensitive layers {verb}, up to {args.max_drop_layers}")
    with m.timed("accuracy_control"):
        ranking = S.layer_ranking(suite, float_model, low if to_bits else bits_now, calib_loader, args, sens)
        say("=> accuracy control ranking (most sensitive first): "
            + ", ".join(f"{n} {v:.3g}" for n, v in list(ranking.items())[:args.max_drop_layers]))
        scores = {id(q): None}

        def build(changes: dict):
            if not changes:
                return q
            say(f"=> accuracy control: {len(changes)} layer(s) {verb}: {', '.join(changes)}")
            q2 = S.prepare(suite, float_model, args, changes).to(args.device)
            calibrate_stage(suite, q2, data, calib_loader, args, None)
            float_ref = P.correct_biases(suite, q2, calib_loader, args).float_model if args.bias_correction else None
            if args.ptq_recon:
                S.reconstruct(suite, q2, calib_loader, args, float_ref)
            if args.epochs > 0:
                if args.seed is not None:
                    seed_everything(args.seed + 1 + D.rank())
                opt, sched = make_training(suite, q2, steps_per_epoch, args)
                qat_epochs(suite, q2, opt, sched, 0, args.epochs, None, val_loader, args, m, None, **qat_setup)
            return q2

        def evaluate(model) -> float:
            if model is q:
                return value
            res = suite.evaluate(model, val_loader, args, "Accuracy control") if D.is_main() else None
            scores[id(model)] = res
            return D.broadcast_float(res[suite.metric.name] if res is not None else 0.0)

        result = accuracy_controlled(build, evaluate, float_value, args.max_drop, ranking,
                                     max_layers=args.max_drop_layers, higher_is_better=higher, bits=to_bits)
    tries = [{"changes": list(ch), "metric": v} for ch, v in result.history]
    rec.update(metric=result.metric, drop=round(result.drop, suite.digits), within_budget=result.within_budget,
               changes=dict(result.changes), action=action, tries=tries, seconds=round(time.time() - t0, 2))
    m.extras["accuracy_control"] = rec
    verdict = "within" if result.within_budget else "still above"
    if not result.changes:
        say(f"=> accuracy control: no change did better; the run's model is kept ({verdict} --max-drop)")
        return q, value, best
    q = result.model
    args.layer_config = with_layer_changes(getattr(args, "layer_config", None) or {}, result.changes)
    if D.is_main():  # the checkpoint holds no optimizer: the epochs are done (a --resume has nothing to train)
        record_qat(suite, q, scores.get(id(q)), val_loader, args, m)
        C.save_all(suite, q, None, None, args.epochs, result.metric, True, paths, args, m)
    say(f"=> accuracy control: {suite.metric.name} {fmt(result.metric)} (drop {fmt(result.drop)}, {verdict} "
        f"--max-drop {args.max_drop:g}) with {len(result.changes)} layer(s) {verb}: {', '.join(result.changes)}; "
        "saved and exported")
    D.barrier()
    return q, result.metric, result.metric if best is None or suite.metric.better(result.metric, best) else best


def analyse(suite: Suite, q, calib_loader, val_loader, args, m: RunMetrics) -> None:
    """--profile and --sensitivity on rank 0 (ts_qat_pytorch.analysis: profile.py, fallback.py)."""
    if args.profile and D.is_main():
        S.profile_stage(suite, q, calib_loader, args, m)
    if args.sensitivity and D.is_main():
        S.sensitivity_stage(suite, q, val_loader, args, m)


def finish(args, m: RunMetrics, data) -> int:
    """Skipped images, the metrics JSON, the summary line and the comparison with --baselines (exit 1 on failure)."""
    counts = {k: skipped_images(d) for k, d in (("train", data.train), ("val", data.val), ("calib", data.calib))}
    counts = {k: v for k, v in counts.items() if v is not None}
    if counts:
        m.run["skipped_images"] = counts
    return m.finish(args.baselines)
