"""Stage 15 of the pipeline: --profile (per-layer float vs fake-quant) and --sensitivity (one layer at a time left
float), rank 0, with the core's ts_qat_pytorch.analysis (profile.py, fallback.py)."""
from __future__ import annotations

import json
import os

from suites.common import distributed as D
from suites.common.stages.evaluate import measure
from suites.common.training import batch_inputs

say = D.say


def analyse(run, q) -> None:
    if run.config.profile and D.is_main():
        run.stage_end("profile", profile(run, q))
    if run.config.sensitivity and D.is_main():
        run.stage_end("sensitivity", sensitivity(run, q))


def profile(run, q) -> list:
    """Per-layer float vs fake-quant on two calibration batches: table (worst first), CSV and PNG."""
    from ts_qat_pytorch.analysis import profile as profiler
    cfg, m = run.config, run.metrics
    batches = ((batch_inputs(b, run.device)[0], None) for b in run.calib_loader)
    rows = profiler.profile_layers(q, batches, max_batches=2)
    csv_path = os.path.join(cfg.out_dir, f"{cfg.arch}_profile.csv")
    png_path = os.path.join(cfg.out_dir, f"{cfg.arch}_profile.png")
    profiler.write_profile_csv(rows, csv_path)
    profiler.plot_profile(rows, png_path, title=f"{cfg.arch} {run.backend}: float vs fake-quant per layer")
    say("=> per-layer float vs fake-quant (worst first)\n" + profiler.format_profile(rows, limit=25))
    say(f"=> profile written to {csv_path} and {png_path}")
    m.files.update(profile_csv=csv_path, profile_png=png_path)
    m.run["profile"] = {"layers": len(rows), "worst_layer": rows[0]["layer"] if rows else None,
                        "worst_sqnr_db": rows[0]["sqnr_db"] if rows else None}
    return rows


def sensitivity(run, q, recover: float = 0.8, max_layers: int = 8) -> dict:
    """One layer at a time left float, the suite's metric on the validation set (--val-images limits it): the
    ranking, and the fewest float layers that win back most of the loss as prepare_by_platform's exclusions."""
    from ts_qat_pytorch.analysis import fallback as SE
    from ts_qat_pytorch.utils.utils import atomic_write_bytes
    metric, m = run.suite.metric, run.metrics
    sign = 1.0 if metric.direction == "higher" else -1.0  # the helpers maximise

    def evaluate(model) -> float:
        return sign * measure(run, model, "Sensitivity")[metric.name]

    res = SE.float_fallback_ranking(q, evaluate)
    say("=> sensitivity: metric with each layer alone left float\n" + SE.format_ranking(res))
    excl = SE.recovery_exclude_list(q, evaluate, res, recover=recover, max_layers=max_layers)
    base = os.path.join(run.config.out_dir, f"{run.config.arch}_")
    cfg = SE.write_exclude_config(excl, base + "exclude.json")
    SE.plot_ranking(res, base + "sensitivity.png")
    atomic_write_bytes(base + "sensitivity.json", json.dumps({**res, "exclude": excl}, indent=1).encode())
    say(f"=> leave float {excl['exclude_module_name']}: {metric.name} {sign * excl['metric']:.3f} "
        f"(recovers {100 * excl['recovered_fraction']:.0f}% of the gap); {base}exclude.json: {json.dumps(cfg)}")
    m.files.update(sensitivity=base + "sensitivity.json", exclude=base + "exclude.json")
    m.run["sensitivity"] = {"exclude_module_name": excl["exclude_module_name"], "metric": sign * excl["metric"],
                            "recovered_fraction": excl["recovered_fraction"]}
    return res
