"""Stage 16 of the pipeline: the exported int8 model in onnxruntime (CPU, all graph optimisations) on the validation
set, then in each --deploy target's toolchain (ts_qat_pytorch.deploy)."""
from __future__ import annotations

import os
import time

import torch

from suites.common import distributed as D
from suites.common.suite import SuiteError

say = D.say
DEPLOY_LABEL = {"rknn": "RKNN"}


def ort_eval(run, suite) -> None:
    """Rank 0: the suite's metric of the exported file in onnxruntime (the suite told: ``ort_eval``), then each
    --deploy target."""
    if not run.config.no_ort_eval:
        from ts_qat_pytorch.onnx.verify import ort_session
        path = run.metrics.files["onnx"]
        with run.metrics.timed("ort_eval"):
            sess = ort_session(path, threads=torch.get_num_threads())
            scores = suite.evaluate_onnx(sess, run.val_loader, run, "ORT int8")
        ev = run.evaluated("ort", scores)
        say(f"=> ORT int8 {run.describe(ev.scores)} ({path})")
    for target in run.config.deploy:
        deploy(run, suite, target)


def deploy(run, suite, target: str) -> None:
    """The exported file imported by a deployment toolchain and the suite's metric on the validation set as that
    toolchain runs it: the metrics' ``deploy[target]``, beside QAT and onnxruntime."""
    from ts_qat_pytorch.deploy import DeployError, close_session, open_session
    m, platform = run.metrics, run.config.deploy_platform
    path = m.files["onnx"]
    label = f"{DEPLOY_LABEL.get(target, target)} {platform}"
    with m.timed(f"deploy_{target}"):
        try:
            sess = open_session(path, target, platform=platform)
        except DeployError as exc:  # recorded with the run's other figures, then the run fails
            m.data["deploy"][target] = {"platform": platform, "error": str(exc)}
            m.write()
            raise SuiteError(str(exc)) from exc
        try:
            say(f"=> {label}: imported and built {os.path.basename(path)} in {sess.build_s:.1f} s (log: "
                f"{sess.log_path})")
            t0 = time.time()
            scores = dict(suite.evaluate_onnx(sess, run.val_loader, run, label))
            scores.pop("detail", None)
        finally:
            close_session(sess)
    m.record_deploy(target, scores, platform=platform, build_s=round(sess.build_s, 2),
                    eval_s=round(time.time() - t0, 2), file_bytes=os.path.getsize(path),
                    toolkit_version=getattr(sess, "toolkit_version", None), log=sess.log_path)
    rec = m["deploy"][target]
    gaps = ", ".join(f"{v:+.{suite.digits}f} vs {k[6:].upper()}" for k, v in rec.items() if k.startswith("minus_"))
    say(f"=> {label} {run.describe(scores)}{f' ({gaps})' if gaps else ''}")
