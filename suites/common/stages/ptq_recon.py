"""Stage 10 of the pipeline: --ptq-recon, PTQ reconstruction of the calibrated model
(ts_qat_pytorch.advanced_ptq.ptq_reconstruction: AdaRound / BRECQ / QDrop) before QAT."""
from __future__ import annotations

import json
import time

import torch

from suites.common import distributed as D
from suites.common.stages.evaluate import after_step, calibrated
from suites.common.training import batch_inputs, seed_everything


def as_batch(q, inputs: tuple):
    """A suite's model inputs as a batch the core's PTQ steps feed: the tensor, or (several inputs) a dict of the
    traced model's input names."""
    if len(inputs) == 1:
        return inputs[0]
    names = [n.target for n in q.graph.nodes if n.op == "placeholder"]
    return dict(zip(names, inputs))


def ptq_batches(run, q) -> tuple[list, int]:
    """(the first --ptq-images calibration images as batches the core's PTQ steps feed, their count)."""
    batches, n = [], 0
    for b in run.calib_loader:
        inputs = batch_inputs(b, torch.device("cpu"))[0]
        batches.append(as_batch(q, inputs))
        n += int(inputs[0].shape[0]) if isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 1
        if n >= run.config.ptq_images:
            break
    return batches, n


def reconstruct(run, q, float_model=None):
    """ptq_reconstruction of the calibrated model (in place) on the first --ptq-images calibration images, with
    ``cfg.ptq_config``; seeded, so every rank of a distributed run fits the same. ``float_model``: the float
    reference after --bias-correction (the model before the correction)."""
    from ts_qat_pytorch.advanced_ptq import ptq_reconstruction
    cfg = run.config
    batches, n = ptq_batches(run, q)
    seed_everything((cfg.seed or 0) + 17)
    D.say(f"=> PTQ reconstruction on {n} calibration images ({len(batches)} batches): {json.dumps(cfg.ptq_config)}")
    return ptq_reconstruction(getattr(q, "module", q), batches, cfg.ptq_config, float_model=float_model)


def ptq_stage(run, q, float_model=None, before: dict | None = None) -> dict | None:
    """After calibration (and --bias-correction: its float reference ``float_model`` and its corrected model's
    scores ``before``): the calibrated (min/max, round-to-nearest) model's metric, the reconstruction (the core logs
    each block), the reconstructed model's metric; recorded under the metrics' extras "ptq". Returns the
    reconstructed model's scores (rank 0; None elsewhere)."""
    cfg = run.config
    rec = {"config": dict(cfg.ptq_config)}
    before = calibrated(run, q, rec, before)
    t0 = time.time()
    with run.metrics.timed("ptq_recon"):
        report = reconstruct(run, q, float_model)
    rec["seconds"] = round(time.time() - t0, 2)
    units = report.units
    D.say("=> PTQ reconstruction per unit (output MSE against float)\n" + report.table())
    rec.update(units=len(units), images=cfg.ptq_images,
               loss_before=sum(u.loss_before for u in units), loss_after=sum(u.loss_after for u in units),
               reverted=[u.name for u in units if u.reverted],
               per_unit=[{"name": u.name, "layers": len(u.layers), "loss_before": u.loss_before,
                          "loss_after": u.loss_after, "seconds": round(u.seconds, 2)} for u in units])
    after = after_step(run, q, "reconstructed", before, rec, "ptq")
    run.stage_end("ptq_recon", q)
    return after
