"""Stage 6 of the pipeline: --mixed-precision on the float model: each layer's sensitivity, the bits per layer an
integer linear program picks under the budget; the result is the run's quantization plan (``run.backend``,
``run.layer_config``). Also the layer sensitivities accuracy control ranks by."""
from __future__ import annotations

import os
import time

from torch import nn

from suites.common import distributed as D
from suites.common.stages.prepare import prepare
from suites.common.suite import SuiteError
from suites.common.training import batch_inputs, on_device

say = D.say


def search_fns(run, suite):
    """forward(model, batch) and loss_fn(output, batch, float output) of the core's sensitivity: the batch's inputs
    and the suite's training loss."""
    def forward(model, batch):
        return model(*batch_inputs(batch, run.device)[0])

    def loss_fn(output, batch, float_output):
        return suite.loss(output, batch_inputs(batch, run.device)[1])[0]
    return forward, loss_fn


def first_batches(loader_, n: int) -> list:
    out = []
    for b in loader_:
        out.append(b)
        if len(out) >= n:
            break
    return out


def costs(run, suite, model: nn.Module) -> dict:
    """Each quantized layer's weights and MACs per sample (one forward of the example input), and the budget checked
    against what --candidates can reach: an error before the float stage and the search."""
    from ts_qat_pytorch.mix_precision import budget_range, layer_costs
    cfg = run.config
    q = prepare(run, suite, model)
    found = layer_costs(q, on_device(run.data.example, next(q.parameters()).device), forward=lambda mm, x: mm(*x))
    if not found:
        raise SuiteError("--mixed-precision: the prepared model has no quantized layers")
    acts = cfg.act_candidates or [cfg.a_bit or 8]
    (key, value), = cfg.budget.items()
    lo, hi = budget_range(found, cfg.budget, cfg.candidates, acts)
    flag, unit = {"avg_bits": ("--avg-bits", 1), "size_bits": ("--size-kib", 8192), "bops": ("--bops", 1)}[key]
    if value < lo * (1 - 1e-9):
        raise SuiteError(f"{flag} {value / unit:g} cannot be met: with --candidates "
                         f"{' '.join(map(str, cfg.candidates))} the {len(found)} quantized layers need at least "
                         f"{lo / unit:g} (at most {hi / unit:g}); raise the budget or add a smaller candidate")
    return found


def sensitivity(run, suite, model: nn.Module, w_bits, a_bits=()):
    """The core's layer_sensitivity of ``model`` prepared with the run's plan (--sensitivity-method, --mp-batches,
    --mp-samples, --mp-blockwise)."""
    from ts_qat_pytorch.mix_precision import layer_sensitivity
    cfg = run.config
    forward, loss_fn = search_fns(run, suite)
    return layer_sensitivity(prepare(run, suite, model), first_batches(run.calib_loader, cfg.mp_batches), w_bits,
                             cfg.sensitivity_method, loss_fn=loss_fn, n_samples=cfg.mp_samples,
                             blockwise=cfg.mp_blockwise, act_candidates=a_bits, forward=forward)


def search(run, suite, model: nn.Module, layer_costs: dict):
    """The sensitivity search, the bit allocation under the budget, its files (<arch>_mixed_precision/:
    mixed_precision.json, layers.csv, bits_vs_sensitivity.png, written by tools/mixed_precision.py's writers) and
    records; sets the run's quantization plan. Returns the Sensitivity (accuracy control ranks layers with it).
    Rank 0 searches, the other ranks receive the result."""
    from ts_qat_pytorch.mix_precision import allocate_bits, report
    cfg, m = run.config, run.metrics
    result = record = None
    if D.is_main():
        with m.timed("mixed_precision"):
            t0 = time.time()
            say(f"=> mixed precision: {cfg.sensitivity_method} sensitivity of {len(layer_costs)} layers at bits "
                f"{cfg.candidates}{f', activations at {cfg.act_candidates}' if cfg.act_candidates else ''} on "
                f"{min(cfg.mp_batches, len(run.calib_loader))} calibration batches, budget {cfg.budget}")
            sens = sensitivity(run, suite, model, cfg.candidates, cfg.act_candidates or ())
            try:
                alloc = allocate_bits(sens, layer_costs, cfg.budget, act_bits=cfg.a_bit or 8)
            except ValueError as exc:
                raise SuiteError(f"--mixed-precision: {exc}") from None
            folder = os.path.join(cfg.out_dir, f"{cfg.arch}_mixed_precision")
            report.write_outputs(folder, alloc, sens)
            say("=> mixed precision allocation\n" + report.table(alloc))
            result = (sens, alloc.module_qconfig, alloc.backend)
            record = {"budget": alloc.budget, "achieved": alloc.achieved, "method": sens.method,
                      "candidates": list(sens.candidates), "act_candidates": list(sens.act_candidates) or None,
                      "a_bit": cfg.a_bit or 8, "backend": None, "w_bits": alloc.w_bits, "a_bits": alloc.a_bits,
                      "objective": alloc.objective, "batches": min(cfg.mp_batches, len(run.calib_loader)),
                      "samples": cfg.mp_samples, "blockwise": cfg.mp_blockwise, "seconds": round(time.time() - t0, 2)}
            m.files.update(mixed_precision=os.path.join(folder, "mixed_precision.json"),
                           mixed_precision_csv=os.path.join(folder, "layers.csv"),
                           mixed_precision_png=os.path.join(folder, "bits_vs_sensitivity.png"))
    sens, module_qconfig, backend = D.broadcast_object(result)
    if backend == "TSQAT" and (cfg.a_bit or 8) < 8:
        backend = "Experimental"
    run.backend, run.layer_config = backend, {"module_qconfig": module_qconfig}
    m.data["backend"] = backend
    if D.is_main():
        m.extras["mixed_precision"] = {**record, "backend": backend}
        say(f"=> mixed precision: backend {backend}, config {m.files['mixed_precision']}")
    return run.stage_end("mixed_precision", sens)
