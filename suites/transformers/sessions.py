"""nox sessions of the transformers suite. Exec'd by the root noxfile, which injects ``run_py`` and ``ROOT``.

    python3 -m nox -s transformers_float_eval   # float fine-tune of MiniLM-L6 on Austen (cached) + evaluation
    python3 -m nox -s transformers_qat          # the embedded default end to end (float -> calib -> QAT -> ORT)
    python3 -m nox -s transformers_export       # export + ORT-evaluate the last QAT checkpoint
    python3 -m nox -s transformers_regression   # the default run compared with suites/transformers/baselines.json

Extra arguments after ``--`` go to main.py (e.g. ``-- --model bert-base-uncased --data DIR``).
"""
import nox

run_py = globals().get("run_py")  # injected by the root noxfile
ROOT = globals().get("ROOT")


def _main():
    return str(ROOT / "suites" / "transformers" / "main.py")


def _out():
    return ["--output-dir", str(ROOT / "checkpoint")]  # outputs in checkpoint/transformers/; posargs may override


@nox.session
def transformers_float_eval(session: nox.Session) -> None:
    """Float MiniLM-L6 fine-tuned on the six Austen novels (cached): accuracy and macro-F1 on the test chapters."""
    run_py(session, _main(), *_out(), "--not-qat", *session.posargs)


@nox.session
def transformers_qat(session: nox.Session) -> None:
    """The embedded default end to end; metrics in checkpoint/transformers/minilm_metrics.json, the float model as
    a Hugging Face folder in checkpoint/transformers/minilm_float_hf/."""
    run_py(session, _main(), *_out(), *session.posargs)


@nox.session
def transformers_export(session: nox.Session) -> None:
    """Export the last QAT checkpoint (checkpoint/transformers/minilm_checkpoint.pth, from transformers_qat) to QDQ
    ONNX and evaluate it in onnxruntime; without that checkpoint, PTQ-calibrate the float model instead."""
    run_py(session, *export_command(session.posargs), *session.posargs)


def export_command(posargs) -> list[str]:
    """The export session's program and flags (also what `nox -s deploy_check -- transformers` runs, plus --deploy)."""
    ckpt = ROOT / "checkpoint" / "transformers" / "minilm_checkpoint.pth"
    args = ["--evaluate"]
    if ckpt.exists() and "--resume" not in posargs:
        args += ["--resume", str(ckpt)]
    return [_main(), *_out(), *args]


@nox.session
def transformers_regression(session: nox.Session) -> None:
    """The default run (float fine-tune reused from the cache) checked against baselines.json."""
    run_py(session, _main(), *_out(), "--baselines", str(ROOT / "suites" / "transformers" / "baselines.json"),
           "--metrics", str(ROOT / "checkpoint" / "transformers" / "regression_metrics.json"), *session.posargs)
