"""Stage 1 of the pipeline: everything cheap checked before long work (the flags' ranges were checked when the
config was resolved: suites/common/cli.py), and the quantization plan a --resume checkpoint records."""
from __future__ import annotations

from suites.common import checkpoints as C
from suites.common import distributed as D
from suites.common.suite import SuiteError

say = D.say


def before_long_work(run) -> None:
    """QAT needs a trained model; --resume, --model-path and --teacher-path are readable; --deploy can import."""
    cfg = run.config
    qat = not cfg.not_qat
    if qat and not cfg.embedded and not (cfg.pretrained or cfg.model_path or cfg.resume):
        raise SuiteError("QAT fine-tunes a trained model: give one of --pretrained, --model-path or --resume "
                         "(or --not-qat to train a float model from scratch)")
    if cfg.resume and not qat:
        raise SuiteError("--resume restores QAT checkpoints; with --not-qat use --model-path")
    for flag, path in (("--model-path", cfg.model_path), ("--teacher-path", cfg.teacher_path)):
        if path:
            C.read_state_dict(path, flag)  # readable, a state_dict
    if cfg.resume:
        C.check_resume(cfg)
        resumed_layers(run)
    if cfg.deploy:
        from ts_qat_pytorch.deploy import DeployError, find_python
        if cfg.no_export:
            raise SuiteError("--deploy imports the exported file: drop --no-export")
        try:
            find_python()
        except DeployError as exc:
            raise SuiteError(str(exc)) from exc


def resumed_layers(run) -> None:
    """A --resume checkpoint that records per-layer quantization (mixed precision, accuracy control): the model is
    prepared the same way (its backend and layer settings; the search is not run again)."""
    cfg, m = run.config, run.metrics
    ck = C.read_checkpoint(cfg.resume, "--resume") if D.is_main() else None
    rec = D.broadcast_object(ck.get("layer_config") if isinstance(ck, dict) else None)  # every rank prepares alike
    if not rec:
        return
    run.layer_config, run.backend = rec["prepare"], rec["backend"]
    m.data["backend"] = run.backend
    m.extras["layer_config"] = {"backend": run.backend, **rec["prepare"], "from": cfg.resume}
    say(f"=> --resume: the checkpoint's per-layer quantization ({len(rec['prepare'].get('module_qconfig') or {})} "
        f"layer settings, backend {run.backend}){' instead of a new search' if cfg.mixed_precision else ''}")
