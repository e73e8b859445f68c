"""The one pipeline of every suite, read top to bottom in :func:`run`:

    checks before long work -> data -> float model (fine-tune, cached) -> float eval -> teacher -> [--cle,
    --smoothquant: float processing] -> [--mixed-precision: sensitivity search, bit allocation] -> prepare ->
    calibration -> [--bias-correction] -> [--ptq-recon: PTQ reconstruction] -> QAT epochs (distillation; each
    epoch: eval, atomic checkpoints, export; --epochs 0: the PTQ model saved and exported instead) -> [--max-drop:
    accuracy control] -> replica check -> profile / sensitivity -> onnxruntime eval -> metrics JSON -> baselines

Each step is a file of suites/common/stages/, a function of the :class:`~suites.common.run.Run` and the suite.
A suite (suites/common/suite.py) provides its model, data, metric and recipe; ``python -m suites <name>`` runs it
(:func:`main`). :func:`main` parses the flags, resolves them once into the run's frozen config, picks the devices
(``--device``, ``--gpu``; neither: one, the first GPU, else the CPU) and starts the processes: one, one per GPU when
several are named (DistributedDataParallel), torchrun's, or ``--multiprocessing-distributed``'s.
Outputs go to ``<output-dir>/<suite>/`` under the manual's names (``<arch>_checkpoint.pth`` ...); only rank 0
logs and writes.
"""
from __future__ import annotations

import copy
import logging
import os
import sys
import warnings

import torch
import torch.distributed as dist

from suites.common import checkpoints as C
from suites.common import distributed as D
from suites.common.cli import build_parser, resolve, set_log_level, threads
from suites.common.devices import describe, select_devices
from suites.common.history import EpochHistory
from suites.common.metrics import RunMetrics
from suites.common.run import Run, RunConfig, output_paths
from suites.common.stages import accuracy_control as AC
from suites.common.stages import checkpoint as CK
from suites.common.stages.analysis import analyse
from suites.common.stages.bias_correction import bias_correction_stage
from suites.common.stages.calibrate import calibrate
from suites.common.stages.checks import before_long_work
from suites.common.stages.evaluate import evaluate, record_qat
from suites.common.stages.export import export
from suites.common.stages.float_model import build, float_finetune, layout, train_float
from suites.common.stages.float_tools import check_float_tools, float_tools
from suites.common.stages.mixed_precision import costs, search
from suites.common.stages.ort_eval import ort_eval
from suites.common.stages.prepare import prepare
from suites.common.stages.ptq_recon import ptq_stage
from suites.common.stages.qat import make_training, qat_epochs, save_and_export
from suites.common.stages.teacher import build_teacher
from suites.common.suite import Suite, SuiteError
from suites.common.training import (EpochSubsetSampler, Training, loader, seed_everything, set_rng_state,
                                    skipped_images)

logger = logging.getLogger("suites")
say = D.say


def main(suite: Suite, argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = build_parser(suite).parse_args(argv)
    set_log_level(flags.log_level, suite.name)
    if threads(flags) > 0:
        torch.set_num_threads(threads(flags))
    suite = copy.deepcopy(suite)  # what a suite learns during a run stays with that run
    bad_input = (SuiteError, *suite.errors)
    out_dir = flags.output_dir
    try:
        torchrun = D.under_torchrun(flags)
        # first of all: --device 1,2 becomes CUDA_VISIBLE_DEVICES, which only counts before CUDA starts
        devices = select_devices(flags.device, flags.gpu, every=torchrun)
        cfg = resolve(suite, flags)
        out_dir = cfg.out_dir
        cfg = cfg.replace(argv=argv, **processes(cfg, devices, torchrun))
        if cfg.spawn:
            import torch.multiprocessing as mp
            try:
                mp.spawn(_spawned, nprocs=cfg.nproc, args=(suite, devices, cfg))
            except mp.ProcessExitedException as exc:
                return exc.exit_code or 1
            return 0
        local = int(os.environ.get("LOCAL_RANK", 0)) if torchrun else 0
        return worker(local, suite, devices, cfg)
    except bad_input as exc:
        print(f"error: {error_message(exc)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the last complete checkpoints in {out_dir} are intact (writes are atomic)",
              file=sys.stderr, flush=True)
        return 130


def processes(cfg: RunConfig, devices, torchrun: bool) -> dict:
    """The process layout: the world size, whether this process spawns one per device (and how many)."""
    if cfg.seed is not None and not cfg.embedded:
        warnings.warn("You have chosen to seed training. This will turn on the CUDNN deterministic setting, "
                      "which can slow down your training considerably!")
    world_size = cfg.world_size
    if cfg.dist_url == "env://" and world_size == -1:
        world_size = int(os.environ.get("WORLD_SIZE", -1))
    spawn = cfg.multiprocessing_distributed or (len(devices) > 1 and not torchrun)
    nproc = (len(devices) if devices[0].type == "cuda" else 2) if spawn else 1
    if spawn:
        world_size = nproc * max(1, world_size)
    return dict(world_size=world_size, distributed=world_size > 1 or spawn, spawn=spawn, nproc=nproc,
                multiprocessing_distributed=cfg.multiprocessing_distributed or spawn)


def _spawned(local: int, suite: Suite, devices, cfg: RunConfig) -> None:
    rc = worker(local, suite, devices, cfg)
    if rc:
        sys.exit(rc)  # mp.spawn reports it to main(), which returns it


def worker(local: int, suite: Suite, devices, cfg: RunConfig) -> int:
    """One process: its device, the process group, the pipeline."""
    if devices[0].type == "cuda" and local >= len(devices):
        raise SuiteError(f"process {local} of this node has no GPU: --device names {describe(devices)}; start as many "
                         "processes per node as GPUs (torchrun --nproc_per_node)")
    device = devices[local] if devices[0].type == "cuda" else devices[0]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    set_log_level(cfg.log_level, suite.name)
    if threads(cfg) > 0:
        torch.set_num_threads(threads(cfg))
    if cfg.distributed:
        D.init_process(cfg, local, cfg.nproc, device)
        # rank 0's output folder: a suite's choice may look at the disk (yolov5's exp, exp2 ...), which another rank
        # may have changed meanwhile
        out_dir, metrics = D.broadcast_object((cfg.out_dir, cfg.metrics))
        cfg = cfg.replace(out_dir=out_dir, metrics=metrics)
    try:
        return run(suite, cfg, device)
    except (SuiteError, *suite.errors) as exc:
        print(f"error: {error_message(exc)}", file=sys.stderr, flush=True)
        return 2
    finally:
        if cfg.distributed and dist.is_initialized():
            dist.destroy_process_group()


def error_message(exc: BaseException) -> str:
    """The error's own text; one raised in a DataLoader worker arrives wrapped with the worker's traceback, of
    which the last line is the error itself."""
    msg = str(exc)
    if "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg


def new_run(suite: Suite, cfg: RunConfig, device) -> Run:
    qat = not cfg.not_qat
    m = RunMetrics(cfg.metrics, suite.name, cfg.arch, cfg.backend if qat else None, suite.metric,
                   digits=suite.digits, entry=f"suites/{suite.name}/{suite.script}", argv=cfg.argv)
    return Run(cfg, suite, device, m, world=D.world(), rank=D.rank(), backend=cfg.backend,
               paths=output_paths(cfg.out_dir, cfg.arch))


def run(suite: Suite, cfg: RunConfig, device) -> int:
    r = new_run(suite, cfg, device)
    m, qat = r.metrics, not cfg.not_qat
    if cfg.seed is not None:
        seed_everything(cfg.seed)
        torch.backends.cudnn.deterministic = True

    # ---- everything cheap is checked before long work; the data
    before_long_work(r)
    r.data = suite.datasets(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    m.run.update(embedded=cfg.embedded, dataset=r.data.name, world_size=r.world, devices=describe([device]),
                 batch_size=cfg.batch_size, val_images=len(r.data.val), seed=cfg.seed)
    m.extras.update(r.data.facts)
    r.stage_end("data", r.data)

    # ---- the float model: built, fine-tuned on the embedded data (cached), evaluated
    model = build(r, suite)
    check_float_tools(r, suite, model)  # --cle / --smoothquant find what they work on, before long work
    searching = qat and cfg.mixed_precision and not r.layer_config
    layer_costs = costs(r, suite, model) if searching else None  # the budget, before long work
    per_rank_batch = max(1, cfg.batch_size // r.world)
    r.val_loader = loader(r.data.val, max(per_rank_batch, cfg.val_batch_size or per_rank_batch), cfg.workers,
                          collate_fn=suite.collate)
    if cfg.finetune_float:
        float_finetune(r, suite, model)
    model.to(device, memory_format=layout(suite))
    control = qat and cfg.max_drop is not None and not cfg.evaluate
    # the float model's metric: what QAT is measured against (the metrics' qat_minus_float), and -e --not-qat's result
    if cfg.embedded or cfg.finetune_float or control or (cfg.evaluate and not qat) or (
            qat and not cfg.resume and not cfg.evaluate):
        if D.is_main():
            evaluate(r, model, "float")
    if not qat:
        if not cfg.embedded and not cfg.evaluate and not cfg.finetune_float:
            m.history = EpochHistory(r.paths["results_csv"], r.paths["results_png"], suite.metric.name,
                                     keep_before=cfg.start_epoch)
            train_float(r, suite, model)
        return finish(r)

    # ---- QAT: teacher (checked before long work), mixed precision, prepare, calibrate + reconstruct (unless resuming)
    model.to(memory_format=torch.contiguous_format)  # the traced QAT model gains nothing from channels_last
    teacher = build_teacher(r, suite, model) if not cfg.evaluate else None
    r.calib_loader = loader(r.data.calib, per_rank_batch, cfg.workers, collate_fn=suite.collate,
                            sampler=EpochSubsetSampler(len(r.data.calib), cfg.calib_batches * per_rank_batch,
                                                       (cfg.seed or 0) + 13))
    model = float_tools(r, suite, model)  # --cle, --smoothquant
    sens = search(r, suite, model, layer_costs) if searching else None
    q = prepare(r, suite, model).to(device)
    ptq_scores = post_training(r, q)
    float_model = model if control else None
    del model

    # ---- QAT training set-up: loader, optimizer, LR schedule; or the state of --resume
    sampler = EpochSubsetSampler(len(r.data.train), cfg.train_images, cfg.seed or 0, r.rank, r.world)
    train_loader = loader(r.data.train, per_rank_batch, cfg.workers, sampler=sampler, collate_fn=suite.collate)
    optimizer, scheduler = make_training(r, suite, q, len(train_loader))
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None
    training = Training(optimizer, scheduler, teacher, scaler, train_loader, sampler)
    start_epoch, best = resumed(r, q, training)

    if cfg.evaluate:  # -e: evaluate, analyse and export what was given (--resume, or the calibrated model)
        if D.is_main():
            evaluate(r, q, "qat")
        analyse(r, q)
        if D.is_main() and not cfg.no_export:
            export(r, suite, q)
            ort_eval(r, suite)
        return finish(r)

    # ---- QAT epochs: train, evaluate (rank 0), checkpoint + export (rank 0)
    last_epoch = cfg.epochs
    if cfg.stop_after_epochs is not None:
        last_epoch = min(cfg.epochs, start_epoch + cfg.stop_after_epochs)
    m.history = EpochHistory(r.paths["results_csv"], r.paths["results_png"], suite.metric.name,
                             keep_before=start_epoch if cfg.resume else 0)  # a resumed run's rows continue the file
    value, best = qat_epochs(r, suite, q, training, range(start_epoch, last_epoch), best)
    if value is None:
        value = no_epochs(r, q, training, ptq_scores, start_epoch)
        best = best if cfg.resume else value
    if control and last_epoch < cfg.epochs:
        say(f"=> --max-drop: after the last epoch (--stop-after-epochs stopped at {last_epoch} of {cfg.epochs})")
    elif control:
        now = AC.accuracy_control(r, suite, AC.Outcome(q, value, best), float_model, sens, training)
        q, value, best = now.q, now.value, now.best
    if cfg.distributed:
        m.run.update(D.replica_check(q))
    analyse(r, q)
    if D.is_main() and m.files.get("onnx"):
        ort_eval(r, suite)
    m.run["best"] = best
    return finish(r)


def post_training(r: Run, q) -> dict | None:
    """Calibration, [--bias-correction], [--ptq-recon] (not with --resume: the checkpoint is past them); the scores
    of the last post-training step's model (rank 0), None when there was none."""
    cfg = r.config
    if cfg.max_drop is not None and cfg.evaluate:
        say("=> --max-drop: not with -e (evaluates what was given)")
    if cfg.resume:
        if cfg.ptq_recon or cfg.bias_correction:
            say("=> --ptq-recon / --bias-correction: not with --resume (the checkpoint is past calibration)")
        return None
    calibrate(r, q)
    scores = float_ref = None  # after --bias-correction the quantizers-off model is no longer the float one
    if cfg.bias_correction:
        scores, float_ref = bias_correction_stage(r, q)
    if cfg.ptq_recon:
        scores = ptq_stage(r, q, float_ref, scores)
    return scores


def resumed(r: Run, q, training: Training) -> tuple[int, float | None]:
    """(the first epoch, the best metric so far): --resume's, restored into the model, the optimizer and the LR
    schedule with the RNG state; else --start-epoch and none."""
    cfg = r.config
    if not cfg.resume:
        if cfg.seed is not None:
            seed_everything(cfg.seed + 1 + r.rank)  # QAT's randomness does not depend on whether the float stage ran
        return cfg.start_epoch, None
    ck = C.restore(q, training.optimizer, training.scheduler, cfg)
    # rank 0's epoch and best: the ranks run the same epochs and agree on the best one
    start_epoch, best = D.broadcast_object((int(ck.get("epoch", 0)), ck.get("best_metric", ck.get("best_acc1"))))
    set_rng_state(ck.get("rng", {}))
    say(f"=> resumed '{cfg.resume}' at epoch {start_epoch} (best {r.suite.metric.name} "
        f"{r.suite.metric.format(best)})")
    return start_epoch, best


def no_epochs(r: Run, q, training: Training, ptq_scores, start_epoch: int) -> float:
    """No QAT epoch ran: --epochs 0 (the calibrated / reconstructed model is the result, saved like an epoch), or a
    --resume past the last epoch (evaluated and exported again). The metric, on every rank."""
    cfg, suite = r.config, r.suite
    value = None
    if not cfg.resume:
        done = "reconstructed" if cfg.ptq_recon else "bias-corrected" if cfg.bias_correction else "calibrated"
        say(f"=> no QAT (--epochs {cfg.epochs}): the {done} model is the result")
        if D.is_main():
            value = record_qat(r, q, ptq_scores)
            save_and_export(r, suite, q, training, CK.Progress(start_epoch, value))
    else:
        say(f"=> nothing to train: start epoch {start_epoch} >= --epochs {cfg.epochs}")
        if D.is_main():
            value = evaluate(r, q, "qat")
            if not cfg.no_export:
                export(r, suite, q)
    return D.broadcast_float(value if value is not None else 0.0)


def finish(r: Run) -> int:
    """Skipped images, the suite's on_run_end, the metrics JSON, the summary line and the comparison with
    --baselines (exit 1 on failure)."""
    data, m = r.data, r.metrics
    counts = {k: skipped_images(d) for k, d in (("train", data.train), ("val", data.val), ("calib", data.calib))}
    counts = {k: v for k, v in counts.items() if v is not None}
    if counts:
        m.run["skipped_images"] = counts
    r.suite.on_run_end(r)
    return m.finish(r.config.baselines)
