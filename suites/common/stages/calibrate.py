"""Stage 8 of the pipeline: calibration of the prepared model on the calibration batches (the suite may adjust the
calibrated model in its ``on_stage_end(run, "calibration", q)``: yolov5 narrows its output ranges)."""
from __future__ import annotations

import contextlib

from suites.common import distributed as D
from suites.common.training import batch_inputs, report_skips, skipped_images
from ts_qat_pytorch.utils.calibrate import calibrate as calibrate_model


def calibrate(run, q, timed: bool = True) -> None:
    """``timed``: the wall time counts as the run's calibration (not in accuracy control's rebuilds)."""
    calib = run.data.calib
    with (run.metrics.timed("calibration") if timed else contextlib.nullcontext()):
        before = skipped_images(calib)
        calibrate_model(q, run.calib_loader, forward=lambda model_, batch: model_(*batch_inputs(batch, run.device)[0]))
        report_skips(calib, before, "Calibration")
        run.stage_end("calibration", q)
    D.say(f"=> calibrated on {len(run.calib_loader.sampler)} images ({len(run.calib_loader)} batches)")
