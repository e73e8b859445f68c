"""Stage 11 of the pipeline: the QAT epochs with distillation. Each epoch: train; then (rank 0) evaluate, save the
checkpoint files (stages/checkpoint.py), export (stages/export.py), keep the best, and write the epoch's row."""
from __future__ import annotations

import time

from torch import nn

from suites.common import distributed as D
from suites.common.history import epoch_row
from suites.common.stages import checkpoint as CK
from suites.common.stages.evaluate import evaluate
from suites.common.stages.export import export
from suites.common.training import (cosine_schedule, make_optimizer, qat_param_groups, set_rng_state, train_epoch)
from ts_qat_pytorch.utils.state import freeze_bn_stats


def make_training(run, suite, q, steps_per_epoch: int):
    """The QAT (optimizer, LR scheduler): the suite's (Suite.make_training), else --optim / --lr / --wd (the
    quantizers' scales at --qparam-lr) with --warmup-steps of linear warm-up and a per-step cosine to 0."""
    cfg = run.config
    made = suite.make_training(q, steps_per_epoch, cfg)
    if made is not None:
        return made
    optimizer = make_optimizer(qat_param_groups(q, cfg.lr, cfg.qparam_lr), cfg.optim, cfg.lr, cfg.momentum,
                               cfg.weight_decay)
    return optimizer, cosine_schedule(optimizer, steps_per_epoch * cfg.epochs, cfg.warmup_steps)


def save_and_export(run, suite, q, training, progress: CK.Progress) -> None:
    """After an epoch (rank 0): the checkpoint files, the export (unless --no-export; the RNG state restored after
    it, so training continues exactly as a resumed run would), the best copies."""
    rng = CK.save(run, q, training, progress)
    if not run.config.no_export:
        export(run, suite, q)
        set_rng_state(rng)
    if progress.is_best:
        CK.keep_best(run, exported=not run.config.no_export)
    paths = run.paths
    D.say(f"=> saved {paths['ckpt']}{' (best)' if progress.is_best else ''}, {paths['float']}, {paths['qparams']}")
    run.stage_end("checkpoint", progress)


def qat_epochs(run, suite, q, training, epochs: range, best=None):
    """QAT epochs: train; when ``training.record``, after each epoch evaluate (rank 0), checkpoint and export
    (rank 0). Without it (accuracy control's rebuilds) train only. Returns (the last epoch's metric or None, best)."""
    cfg, m = run.config, run.metrics
    qm = q
    if run.distributed:
        qm = nn.parallel.DistributedDataParallel(q, device_ids=[run.device.index] if run.device.type == "cuda"
                                                 else None)
    steps_per_epoch = len(training.loader)
    value = None
    for epoch in epochs:
        t0 = time.time()
        training.sampler.set_epoch(epoch)
        if cfg.freeze_bn_epoch is not None and epoch >= cfg.freeze_bn_epoch:
            freeze_bn_stats(q)
        if not training.record:
            train_epoch(run, training.loader, qm, training, epoch)
            continue
        with m.timed("qat_train"):
            train_scores, train_loss = train_epoch(run, training.loader, qm, training, epoch)
        m.run.update(qat_train_loss=train_loss, qat_train_scores=train_scores,
                     qat_steps=steps_per_epoch * (epoch + 1), qat_images_per_epoch=len(training.sampler) * run.world)
        value = D.broadcast_float(evaluate(run, q, "qat") if D.is_main() else 0.0)
        is_best = best is None or suite.metric.better(value, best)
        best = value if is_best else best
        if D.is_main():
            save_and_export(run, suite, q, training, CK.Progress(epoch + 1, best, is_best))
            m.epoch_done(epoch_row("qat", epoch, (train_scores, train_loss), {suite.metric.name: value},
                                   training.optimizer.param_groups[0]["lr"], time.time() - t0))
        D.barrier()
    return value, best
