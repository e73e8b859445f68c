"""Stage 9 of the pipeline: --bias-correction of the calibrated model (ts_qat_pytorch.advanced_ptq.bias_correction),
between calibration and --ptq-recon; skipped with --resume (the checkpoint's biases carry it)."""
from __future__ import annotations

import time

from suites.common import distributed as D
from suites.common.stages.evaluate import after_step, calibrated
from suites.common.stages.ptq_recon import ptq_batches


def correct_biases(run, q):
    """bias_correction of the calibrated model (in place) on the first --ptq-images calibration images; returns its
    report (``report.float_model``: the float reference for --ptq-recon)."""
    from ts_qat_pytorch.advanced_ptq import bias_correction
    batches, n = ptq_batches(run, q)
    D.say(f"=> bias correction on {n} calibration images ({len(batches)} batches)")
    return bias_correction(getattr(q, "module", q), batches)[1]


def bias_correction_stage(run, q):
    """The calibrated model's metric, the correction, the corrected model's metric (rank 0), recorded under the
    metrics' extras "bias_correction". Returns (the corrected model's scores on rank 0, else None; the float
    reference for --ptq-recon)."""
    rec: dict = {}
    before = calibrated(run, q, rec)
    t0 = time.time()
    with run.metrics.timed("bias_correction"):
        report = correct_biases(run, q)
    rec.update(report.to_dict(), seconds=round(time.time() - t0, 2))
    D.say(f"=> bias correction: {report.summary()}")
    after = after_step(run, q, "bias-corrected", before, rec, "bias_correction")
    run.stage_end("bias_correction", q)
    return after, report.float_model
