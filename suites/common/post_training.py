"""The runner's fast post-training steps (suites/common/runner.py calls them in this order):

    [checks, no data: --cle has chains to equalize, --smoothquant LayerNorm -> Linear groups]
    float model -> --cle (fold BN, cross-layer equalization, high-bias absorption) -> --smoothquant -> prepare ->
    calibration -> --bias-correction -> [--ptq-recon] -> QAT

--cle and --smoothquant process the float model before prepare (ts_qat_pytorch.tools); --bias-correction corrects
the calibrated model (ts_qat_pytorch.advanced_ptq.bias_correction). Each records its report and wall time under the
metrics' extras ("cle", "smoothquant", "bias_correction") and logs one summary line. With --resume the float steps
run again (they decide the structure the checkpoint was saved from; its weights then replace theirs), and bias
correction is skipped (the checkpoint's biases carry it).
"""
from __future__ import annotations

import time

from torch import nn

from suites.common import distributed as D
from suites.common.stages import _on, evaluate_calibrated, evaluate_ptq_step, ptq_batches
from suites.common.suite import Suite, SuiteError

say = D.say


def leaf_modules(suite: Suite, model: nn.Module, args) -> list:
    """The suite's leaf modules (its prepare config's): the float tools trace the model as prepare will."""
    return list((suite.prepare_config(model, args) or {}).get("leaf_module", []))


def check_float_tools(suite: Suite, model: nn.Module, args) -> None:
    """Before long work, one trace of the float model: --cle needs a conv -> conv chain, --smoothquant a LayerNorm
    read by a Linear layer."""
    if not (args.cle or args.smoothquant is not None):
        return
    from ts_qat_pytorch.tools import smoothing_groups
    from ts_qat_pytorch.tools.patterns import layer_links, trace
    leaf = leaf_modules(suite, model, args)
    if args.cle and not layer_links(trace(model, leaf))[0]:
        raise SuiteError(f"--cle: {args.arch} has no conv -> [BatchNorm] -> [ReLU / ReLU6] -> conv chain (nor linear "
                         "-> linear) whose values only the next layer reads, so there is nothing to equalize; CLE is "
                         "for convolutional networks such as mobilenet_v2: drop --cle")
    if args.smoothquant is not None:
        groups, skipped = smoothing_groups(model, leaf)
        if not groups:
            why = f" ({'; '.join(f'{n}: {w}' for n, w in skipped)})" if skipped else ""
            raise SuiteError(f"--smoothquant: {args.arch} has no LayerNorm read by a Linear layer that can be "
                             f"smoothed{why}; SmoothQuant is for transformer blocks (LayerNorm -> Q/K/V or FFN "
                             "Linear): drop --smoothquant")


def float_tools_stage(suite: Suite, model: nn.Module, calib_loader, val_loader, args, m) -> nn.Module:
    """--cle, then --smoothquant, on the float model before prepare; returns the processed model."""
    if args.cle:
        model = cle_stage(suite, model, val_loader, args, m)
    if args.smoothquant is not None:
        model = smoothquant_stage(suite, model, calib_loader, args, m)
    return model


def cle_stage(suite: Suite, model: nn.Module, val_loader, args, m) -> nn.Module:
    """ts_qat_pytorch.tools.equalize on the suite's example input. Its ReLU6 -> ReLU and high-bias absorption change
    the float model a little: rank 0 evaluates it again ("float_after" beside the run's "float")."""
    from ts_qat_pytorch.tools import equalize
    t0 = time.time()
    with m.timed("cle"):
        model, report = equalize(model, _on(suite.dummy_input(args), args.device),
                                 leaf_module=leaf_modules(suite, model, args))
    rec = {**report.to_dict(), "seconds": round(time.time() - t0, 2)}
    say(f"=> CLE: {report.summary()}")
    if (report.relu6_replaced or any(a.channels for a in report.absorbed)) and not args.resume and D.is_main():
        name, fmt = suite.metric.name, suite.metric.format
        with m.timed("float_eval"):
            after = suite.evaluate(model, val_loader, args, "Float after CLE")
        before = m["float"]
        rec.update(float_before=before, float_after=after[name], float_after_scores=after)
        say(f"=> float after CLE {suite.describe(after)} (before {fmt(before)}: ReLU6 -> ReLU and high-bias "
            "absorption change it, equalization does not)")
    m.extras["cle"] = rec
    return model


def smoothquant_stage(suite: Suite, model: nn.Module, calib_loader, args, m) -> nn.Module:
    """ts_qat_pytorch.tools.smooth_quant with the activation ranges of the calibration batches (float model)."""
    from ts_qat_pytorch.tools import smooth_quant
    t0 = time.time()
    with m.timed("smoothquant"):
        model, report = smooth_quant(model, calib_loader, args.smoothquant,
                                     forward=lambda mm, b: mm(*suite.inputs(b, args.device)[0]),
                                     leaf_module=leaf_modules(suite, model, args))
    m.extras["smoothquant"] = {**report.to_dict(), "seconds": round(time.time() - t0, 2)}
    say(f"=> SmoothQuant: {report.summary()}")
    return model


def correct_biases(suite: Suite, q, calib_loader, args):
    """ts_qat_pytorch.advanced_ptq.bias_correction of the calibrated model (in place) on the first --ptq-images
    calibration images; returns its report (``report.float_model``: the float reference for --ptq-recon)."""
    from ts_qat_pytorch.advanced_ptq import bias_correction
    batches, n = ptq_batches(suite, q, calib_loader, args)
    say(f"=> bias correction on {n} calibration images ({len(batches)} batches)")
    return bias_correction(getattr(q, "module", q), batches)[1]


def bias_correction_stage(suite: Suite, q, calib_loader, val_loader, args, m):
    """--bias-correction after calibration: the calibrated model's metric, the correction, the corrected model's
    metric (rank 0), recorded under the metrics' extras "bias_correction". Returns (the corrected model's scores on
    rank 0, else None; the float reference for --ptq-recon)."""
    rec: dict = {}
    before = evaluate_calibrated(suite, q, val_loader, args, m, rec)
    t0 = time.time()
    with m.timed("bias_correction"):
        report = correct_biases(suite, q, calib_loader, args)
    rec.update(report.to_dict(), seconds=round(time.time() - t0, 2))
    say(f"=> bias correction: {report.summary()}")
    after = evaluate_ptq_step(suite, q, val_loader, args, m, "bias-corrected", before, rec, "bias_correction")
    return after, report.float_model
