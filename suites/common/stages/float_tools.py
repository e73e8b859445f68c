"""Stage 5 of the pipeline: --cle and --smoothquant process the float model before prepare (ts_qat_pytorch.tools);
each records its report and wall time under the metrics' extras ("cle", "smoothquant") and logs one summary line.
With --resume they run again: they decide the structure the checkpoint was saved from (its weights then replace
theirs). Whether the model has anything to equalize / smooth is checked once it is built, before long work."""
from __future__ import annotations

import time

from torch import nn

from suites.common import distributed as D
from suites.common.stages.evaluate import measure
from suites.common.suite import SuiteError
from suites.common.training import batch_inputs, on_device

say = D.say


def leaf_modules(suite) -> list:
    """The suite's leaf modules (its prepare config's): the float tools trace the model as prepare will."""
    return list(suite.prepare_custom.get("leaf_module", []))


def check_float_tools(run, suite, model: nn.Module) -> None:
    """Before long work, one trace of the float model: --cle needs a conv -> conv chain, --smoothquant a LayerNorm
    read by a Linear layer."""
    cfg = run.config
    if not (cfg.cle or cfg.smoothquant is not None):
        return
    from ts_qat_pytorch.tools import smoothing_groups
    from ts_qat_pytorch.tools.patterns import layer_links, trace
    leaf = leaf_modules(suite)
    if cfg.cle and not layer_links(trace(model, leaf))[0]:
        raise SuiteError(f"--cle: {cfg.arch} has no conv -> [BatchNorm] -> [ReLU / ReLU6] -> conv chain (nor linear "
                         "-> linear) whose values only the next layer reads, so there is nothing to equalize; CLE is "
                         "for convolutional networks such as mobilenet_v2: drop --cle")
    if cfg.smoothquant is not None:
        groups, skipped = smoothing_groups(model, leaf)
        if not groups:
            why = f" ({'; '.join(f'{n}: {w}' for n, w in skipped)})" if skipped else ""
            raise SuiteError(f"--smoothquant: {cfg.arch} has no LayerNorm read by a Linear layer that can be "
                             f"smoothed{why}; SmoothQuant is for transformer blocks (LayerNorm -> Q/K/V or FFN "
                             "Linear): drop --smoothquant")


def float_tools(run, suite, model: nn.Module) -> nn.Module:
    """--cle, then --smoothquant, on the float model before prepare; returns the processed model."""
    if run.config.cle:
        model = run.stage_end("cle", cle(run, suite, model))
    if run.config.smoothquant is not None:
        model = run.stage_end("smoothquant", smoothquant(run, suite, model))
    return model


def cle(run, suite, model: nn.Module) -> nn.Module:
    """ts_qat_pytorch.tools.equalize on the suite's example input. Its ReLU6 -> ReLU and high-bias absorption change
    the float model a little: rank 0 evaluates it again ("float_after" beside the run's "float")."""
    from ts_qat_pytorch.tools import equalize
    m = run.metrics
    t0 = time.time()
    with m.timed("cle"):
        model, report = equalize(model, on_device(run.data.example, run.device), leaf_module=leaf_modules(suite))
    rec = {**report.to_dict(), "seconds": round(time.time() - t0, 2)}
    say(f"=> CLE: {report.summary()}")
    if (report.relu6_replaced or any(a.channels for a in report.absorbed)) and not run.config.resume \
            and D.is_main():
        name, fmt = suite.metric.name, suite.metric.format
        with m.timed("float_eval"):
            after = measure(run, model, "Float after CLE")
        before = m["float"]
        rec.update(float_before=before, float_after=after[name], float_after_scores=after)
        say(f"=> float after CLE {run.describe(after)} (before {fmt(before)}: ReLU6 -> ReLU and high-bias "
            "absorption change it, equalization does not)")
    m.extras["cle"] = rec
    return model


def smoothquant(run, suite, model: nn.Module) -> nn.Module:
    """ts_qat_pytorch.tools.smooth_quant with the activation ranges of the calibration batches (float model)."""
    from ts_qat_pytorch.tools import smooth_quant
    t0 = time.time()
    with run.metrics.timed("smoothquant"):
        model, report = smooth_quant(model, run.calib_loader, run.config.smoothquant,
                                     forward=lambda mm, b: mm(*batch_inputs(b, run.device)[0]),
                                     leaf_module=leaf_modules(suite))
    run.metrics.extras["smoothquant"] = {**report.to_dict(), "seconds": round(time.time() - t0, 2)}
    say(f"=> SmoothQuant: {report.summary()}")
    return model
