"""nox sessions of the segmentation suite. Exec'd by the root noxfile, which injects ``run_py`` and ``ROOT``.

    python3 -m nox -s segmentation_float_eval   # fine-tune (cached) + evaluate the float model
    python3 -m nox -s segmentation_qat          # the whole embedded default: float -> calib -> QAT -> export -> ORT
    python3 -m nox -s segmentation_export       # evaluate + export + ORT-evaluate the last QAT checkpoint
    python3 -m nox -s segmentation_regression   # the default run compared with suites/segmentation/baselines.json

Extra arguments after ``--`` go to main.py (e.g. ``-- --data /voc -nc 21 --model-path lraspp.pth``).
"""
import nox

run_py = globals().get("run_py")  # injected by the root noxfile
ROOT = globals().get("ROOT")


def _main():
    return str(ROOT / "suites" / "segmentation" / "main.py")


def _out():
    return ["--output-dir", str(ROOT / "checkpoint")]  # outputs in checkpoint/segmentation/; posargs may override


@nox.session
def segmentation_float_eval(session: nox.Session) -> None:
    """Float LR-ASPP mobilenet_v2 (stride-4 head) on the synthetic scenes (fine-tuned once, cached): mIoU on
    the 500 validation scenes."""
    run_py(session, _main(), *_out(), "--not-qat", *session.posargs)


@nox.session
def segmentation_qat(session: nox.Session) -> None:
    """The embedded default end to end; metrics in checkpoint/segmentation/lraspp_mobilenet_v2_s4_metrics.json."""
    run_py(session, _main(), *_out(), *session.posargs)


@nox.session
def segmentation_export(session: nox.Session) -> None:
    """Export the last QAT checkpoint (checkpoint/segmentation/lraspp_mobilenet_v2_s4_checkpoint.pth, from
    segmentation_qat) to int8 ONNX and evaluate it in onnxruntime; without it, PTQ-calibrate the float model."""
    run_py(session, *export_command(session.posargs), *session.posargs)


def export_command(posargs) -> list[str]:
    """The export session's program and flags (also what `nox -s deploy_check -- segmentation` runs, plus --deploy)."""
    ckpt = ROOT / "checkpoint" / "segmentation" / "lraspp_mobilenet_v2_s4_checkpoint.pth"
    args = ["--evaluate"]
    if ckpt.exists() and "--resume" not in posargs:
        args += ["--resume", str(ckpt)]
    return [_main(), *_out(), *args]


@nox.session
def segmentation_regression(session: nox.Session) -> None:
    """The default run (float fine-tune reused from the cache) checked against baselines.json."""
    run_py(session, _main(), *_out(), "--baselines", str(ROOT / "suites" / "segmentation" / "baselines.json"),
           "--metrics", str(ROOT / "checkpoint" / "segmentation" / "regression_metrics.json"), *session.posargs)
