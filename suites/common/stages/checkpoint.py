"""Stage 12 of the pipeline: the files of an epoch (rank 0): the QAT checkpoint (what --resume continues from), the
float weights + qparams JSON, and the copies as the best ones. The export between them is stages/export.py."""
from __future__ import annotations

from dataclasses import dataclass

from suites.common.checkpoints import atomic_copy
from suites.common.training import rng_state


@dataclass
class Progress:
    """Where the run is: the epochs done, the best metric so far, whether this epoch is the best."""

    epoch: int
    best: float | None
    is_best: bool = True


def float_tools_record(cfg) -> dict:
    """--cle / --smoothquant as a checkpoint entry: they change the float model's structure before prepare (BatchNorms
    folded, restoring ChannelScales), so a --resume must process it the same way."""
    used = {k: v for k, v in (("cle", cfg.cle), ("smoothquant", cfg.smoothquant)) if v not in (None, False)}
    return {"float_tools": used} if used else {}


def layer_config_record(run) -> dict:
    """The run's per-layer quantization (a mixed-precision allocation, accuracy control's changes) as a checkpoint
    entry: --resume prepares the model the same way from it."""
    return {"layer_config": {"backend": run.backend, "prepare": run.layer_config}} if run.layer_config else {}


def save(run, q, training, progress: Progress) -> dict:
    """The QAT checkpoint and the float weights + qparams JSON; returns the RNG state the export must not change.
    ``training``: its optimizer and LR schedule (None: the epochs are done, nothing to resume)."""
    from ts_qat_pytorch.utils.utils import save_checkpoint, save_qat_checkpoint
    paths, m = run.paths, run.metrics
    rng = rng_state()
    opt, sched = (training.optimizer, training.scheduler) if training is not None else (None, None)
    save_qat_checkpoint(paths["ckpt"], q, opt, sched, epoch=progress.epoch, best_metric=progress.best,
                        metric=run.suite.metric.name, arch=run.config.arch, backend=run.backend, rng=rng,
                        **layer_config_record(run), **float_tools_record(run.config), **run.data.checkpoint)
    save_checkpoint(q, paths["float"], paths["qparams"])
    m.files.update(checkpoint=paths["ckpt"], float_checkpoint=paths["float"], qparams_json=paths["qparams"])
    return rng


def keep_best(run, exported: bool) -> None:
    """This epoch's checkpoint (and ONNX file) copied as the best ones."""
    paths, m = run.paths, run.metrics
    atomic_copy(paths["ckpt"], paths["best"])
    m.files["best_checkpoint"] = paths["best"]
    if exported:
        atomic_copy(paths["onnx"], paths["bestonnx"])
        m.files["best_onnx"] = paths["bestonnx"]
