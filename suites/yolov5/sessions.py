"""nox sessions of the YOLOv5 suite. Exec'd by the root noxfile, which injects ``run_py`` and ``ROOT``.

    python3 -m nox -s yolov5_float_eval   # train (cached) + evaluate the float yolov5n on the synthetic scenes
    python3 -m nox -s yolov5_qat          # the embedded default end to end: float -> calib -> QAT -> export -> ORT
    python3 -m nox -s yolov5_export       # export + ORT-evaluate the last QAT checkpoint (or PTQ without one)
    python3 -m nox -s yolov5_regression   # the default run compared with suites/yolov5/baselines.json

Outputs in checkpoint/yolov5/. Extra arguments after ``--`` go to train_qat.py (e.g. ``-- --data data/coco.yaml
--weights yolov5s.pt``).
"""
import nox

run_py = globals().get("run_py")  # injected by the root noxfile
ROOT = globals().get("ROOT")


def _script():
    return str(ROOT / "suites" / "yolov5" / "train_qat.py")


def _out():
    return ["--output-dir", str(ROOT / "checkpoint")]  # outputs in checkpoint/yolov5/; posargs may override


@nox.session
def yolov5_float_eval(session: nox.Session) -> None:
    """Float yolov5n (v6 layout) trained on the synthetic Fashion-MNIST scenes (cached): COCO mAP."""
    run_py(session, _script(), *_out(), "--metrics", str(ROOT / "checkpoint" / "yolov5" / "float_metrics.json"),
           *session.posargs)


@nox.session
def yolov5_qat(session: nox.Session) -> None:
    """The embedded default end to end; metrics in checkpoint/yolov5/yolov5n-v6_metrics.json."""
    run_py(session, _script(), *_out(), "--quantize", *session.posargs)


@nox.session
def yolov5_export(session: nox.Session) -> None:
    """Export the last QAT checkpoint (checkpoint/yolov5/yolov5n-v6_checkpoint.pth, from yolov5_qat) to int8 QDQ
    ONNX and evaluate it in onnxruntime; without that checkpoint, PTQ-calibrate the float model instead."""
    run_py(session, *export_command(session.posargs), *session.posargs)


def export_command(posargs) -> list[str]:
    """The export session's program and flags (also what `nox -s deploy_check -- yolov5` runs, plus --deploy)."""
    ckpt = ROOT / "checkpoint" / "yolov5" / "yolov5n-v6_checkpoint.pth"
    args = ["--quantize", "--export-only", "--metrics", str(ROOT / "checkpoint" / "yolov5" / "export_metrics.json")]
    if ckpt.exists() and "--resume" not in posargs:
        args += ["--resume", str(ckpt)]
    return [_script(), *_out(), *args]


@nox.session
def yolov5_regression(session: nox.Session) -> None:
    """The default run (float model reused from the cache) checked against baselines.json."""
    run_py(session, _script(), *_out(), "--quantize",
           "--baselines", str(ROOT / "suites" / "yolov5" / "baselines.json"),
           "--metrics", str(ROOT / "checkpoint" / "yolov5" / "regression_metrics.json"), *session.posargs)
