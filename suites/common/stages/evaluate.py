"""Stage 3 of the pipeline: the suite's metric of a PyTorch model (float, QAT fake-quant), logged and recorded;
and the evaluations around a post-training step (the calibrated model before it, the model after it)."""
from __future__ import annotations

from suites.common import distributed as D

say = D.say
EVAL_PREFIX = {"float": "Float", "qat": "QAT"}  # the progress lines' label
EVAL_LABEL = {"float": "float", "qat": "QAT (fake-quant)"}


def measure(run, model, prefix: str) -> dict:
    """The suite's scores of ``model`` on the validation set, without the evaluation's ``detail``."""
    scores = dict(run.suite.evaluate(model, run.val_loader, run, prefix))
    scores.pop("detail", None)
    return scores


def evaluate(run, model, stage: str) -> float:
    """The metric of the float or fake-quant model (``stage``: "float", "qat"), recorded, logged, and the suite
    told (``<stage>_eval``); the headline value."""
    with run.metrics.timed(f"{stage}_eval"):
        scores = run.suite.evaluate(model, run.val_loader, run, EVAL_PREFIX[stage])
    ev = run.evaluated(stage, scores)
    say(f"=> {EVAL_LABEL[stage]} {run.describe(ev.scores)}")
    return ev.scores[run.suite.metric.name]


def record_qat(run, q, scores: dict | None) -> float:
    """The fake-quant model's metric as the run's "qat" (rank 0): ``scores`` already measured, else evaluated."""
    if scores is None:
        return evaluate(run, q, "qat")
    run.evaluated("qat", scores)
    say(f"=> {EVAL_LABEL['qat']} {run.describe(scores)}")
    return scores[run.suite.metric.name]


def calibrated(run, q, rec: dict, before: dict | None = None):
    """The calibrated (min/max, round-to-nearest) model's scores before a post-training step (rank 0; None
    elsewhere): ``before`` when already measured, else evaluated; recorded in ``rec`` as ``calibrated``."""
    if not D.is_main():
        return None
    if before is None:
        with run.metrics.timed("ptq_eval"):
            before = measure(run, q, "PTQ calibrated")
        say(f"=> PTQ calibrated (min/max, round-to-nearest) {run.describe(before)}")
    rec.update(calibrated=before[run.suite.metric.name], calibrated_scores=before)
    return before


def after_step(run, q, step: str, before: dict, rec: dict, key: str):
    """The metric after a post-training step (rank 0; None elsewhere), logged as "PTQ <step>" against the calibrated
    model's and recorded in ``rec`` as the metrics' extras[key]: ``<field>``, ``<field>_scores`` and
    ``<field>_minus_calibrated``, the field being the step's last word ("bias-corrected": "corrected")."""
    if not D.is_main():
        return None
    metric = run.suite.metric
    name, field = metric.name, step.rsplit("-", 1)[-1]
    with run.metrics.timed("ptq_eval"):
        after = measure(run, q, f"PTQ {step}")
    d = metric.format(after[name] - before[name])
    say(f"=> PTQ {step} {run.describe(after)} (calibrated {metric.format(before[name])}, {d})")
    rec.update({field: after[name], f"{field}_scores": after,
                f"{field}_minus_calibrated": round(after[name] - before[name], run.suite.digits)})
    run.metrics.extras[key] = rec
    return after
