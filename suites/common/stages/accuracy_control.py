"""Stage 14 of the pipeline: --max-drop. When the run's model is more than --max-drop worse than float,
mix_precision.accuracy_controlled raises the most sensitive layers to 8 bits (or leaves them float), fewest first,
each try redoing what the run did (prepare, calibrate, --ptq-recon, the QAT epochs), until within --max-drop or
--max-drop-layers. The best model is saved and exported (the layers it changed are recorded in its checkpoint, so
--resume prepares it the same way) and recorded under the metrics' extras "accuracy_control"."""
from __future__ import annotations

import dataclasses
import time

from suites.common import distributed as D
from suites.common.stages import checkpoint as CK
from suites.common.stages.bias_correction import correct_biases
from suites.common.stages.calibrate import calibrate
from suites.common.stages.evaluate import measure, record_qat
from suites.common.stages.mixed_precision import sensitivity
from suites.common.stages.prepare import layer_bits, prepare, prepare_config
from suites.common.stages.ptq_recon import reconstruct
from suites.common.stages.qat import make_training, qat_epochs, save_and_export
from suites.common.training import seed_everything

say = D.say


def layer_ranking(run, suite, float_model, bits: dict, sens=None) -> dict[str, float]:
    """{layer: sensitivity at its bits}, most sensitive first: the mixed-precision search's Sensitivity when there
    was one, else a search at the bits each layer has (weights, plus the measured loss increase of its input at its
    activation bits). Rank 0 ranks."""
    ranking = None
    if D.is_main():
        if sens is None or not all(w in sens.candidates for w, _ in bits.values()):
            say(f"=> accuracy control: {run.config.sensitivity_method} sensitivity of {len(bits)} layers at their "
                "bits")
            sens = sensitivity(run, suite, float_model, sorted({w for w, _ in bits.values()}),
                               sorted({a for _, a in bits.values()}))
        scores = {n: sens.weight[n][w] + (sens.activation.get(n, {}).get(a, 0.0) if sens.activation else 0.0)
                  for n, (w, a) in bits.items() if n in sens.weight}
        ranking = dict(sorted(scores.items(), key=lambda kv: -kv[1]))
    return D.broadcast_object(ranking)


@dataclasses.dataclass
class Outcome:
    """The run's model and metrics before (and after) accuracy control."""

    q: object
    value: float
    best: float | None


def rebuild(run, suite, float_model, training, changes: dict):
    """The run redone with ``changes`` ({layer: bits or None}): prepare, calibrate, [--bias-correction],
    [--ptq-recon], the QAT epochs (trained, not recorded)."""
    cfg = run.config
    q2 = prepare(run, suite, float_model, changes).to(run.device)
    calibrate(run, q2, timed=False)
    float_ref = correct_biases(run, q2).float_model if cfg.bias_correction else None
    if cfg.ptq_recon:
        reconstruct(run, q2, float_ref)
    if cfg.epochs > 0:
        if cfg.seed is not None:
            seed_everything(cfg.seed + 1 + D.rank())
        opt, sched = make_training(run, suite, q2, len(training.loader))
        qat_epochs(run, suite, q2, dataclasses.replace(training, optimizer=opt, scheduler=sched, record=False),
                   range(cfg.epochs))
    return q2


def accuracy_control(run, suite, now: Outcome, float_model, sens, training) -> Outcome:
    from ts_qat_pytorch.mix_precision import accuracy_controlled, with_layer_changes
    cfg, m, metric = run.config, run.metrics, suite.metric
    t0 = time.time()
    higher = metric.direction == "higher"
    float_value = D.broadcast_float(m["float"] if D.is_main() else 0.0)
    drop = (float_value - now.value) if higher else (now.value - float_value)
    rec = {"max_drop": cfg.max_drop, "float": float_value, "metric_before": now.value,
           "drop_before": round(drop, suite.digits), "max_layers": cfg.max_drop_layers}
    fmt = metric.format
    if drop <= cfg.max_drop:
        say(f"=> accuracy control: {metric.name} {fmt(now.value)} is {fmt(drop)} from float {fmt(float_value)}, "
            f"within --max-drop {cfg.max_drop:g}: no layer changed")
        m.extras["accuracy_control"] = {**rec, "metric": now.value, "drop": rec["drop_before"], "within_budget": True,
                                        "changes": {}, "action": None, "tries": [], "seconds": 0.0}
        return now
    bits_now = layer_bits(now.q, prepare_config(run, suite, float_model))
    low = {n: b for n, b in bits_now.items() if min(b) < 8}
    to_bits = None if (cfg.max_drop_float or not low) else 8
    action, verb = ("float", "left float") if to_bits is None else ("8-bit", "raised to 8 bits")
    say(f"=> accuracy control: {metric.name} {fmt(now.value)} is {fmt(drop)} from float {fmt(float_value)}, more "
        f"than --max-drop {cfg.max_drop:g}: the most sensitive layers {verb}, up to {cfg.max_drop_layers}")
    with m.timed("accuracy_control"):
        ranking = layer_ranking(run, suite, float_model, low if to_bits else bits_now, sens)
        say("=> accuracy control ranking (most sensitive first): "
            + ", ".join(f"{n} {v:.3g}" for n, v in list(ranking.items())[:cfg.max_drop_layers]))
        scores = {id(now.q): None}

        def build(changes: dict):
            if not changes:
                return now.q
            say(f"=> accuracy control: {len(changes)} layer(s) {verb}: {', '.join(changes)}")
            return rebuild(run, suite, float_model, training, changes)

        def evaluate(model) -> float:
            if model is now.q:
                return now.value
            res = measure(run, model, "Accuracy control") if D.is_main() else None
            scores[id(model)] = res
            return D.broadcast_float(res[metric.name] if res is not None else 0.0)

        result = accuracy_controlled(build, evaluate, float_value, cfg.max_drop, ranking,
                                     max_layers=cfg.max_drop_layers, higher_is_better=higher, bits=to_bits)
    rec.update(metric=result.metric, drop=round(result.drop, suite.digits), within_budget=result.within_budget,
               changes=dict(result.changes), action=action,
               tries=[{"changes": list(ch), "metric": v} for ch, v in result.history],
               seconds=round(time.time() - t0, 2))
    m.extras["accuracy_control"] = rec
    verdict = "within" if result.within_budget else "still above"
    if not result.changes:
        say(f"=> accuracy control: no change did better; the run's model is kept ({verdict} --max-drop)")
        return now
    q = result.model
    run.layer_config = with_layer_changes(run.layer_config or {}, result.changes)
    if D.is_main():  # the checkpoint holds no optimizer: the epochs are done (a --resume has nothing to train)
        record_qat(run, q, scores.get(id(q)))
        save_and_export(run, suite, q, None, CK.Progress(cfg.epochs, result.metric))
    say(f"=> accuracy control: {metric.name} {fmt(result.metric)} (drop {fmt(result.drop)}, {verdict} "
        f"--max-drop {cfg.max_drop:g}) with {len(result.changes)} layer(s) {verb}: {', '.join(result.changes)}; "
        "saved and exported")
    D.barrier()
    best = result.metric if now.best is None or metric.better(result.metric, now.best) else now.best
    return Outcome(q, result.metric, best)
