"""nox sessions of the ImageNet suite. Exec'd by the root noxfile, which injects ``run_py`` and ``ROOT``.

    python3 -m nox -s imagenet_float_eval   # fine-tune (cached) + evaluate the float model
    python3 -m nox -s imagenet_qat          # the whole embedded default: float -> calib -> QAT -> export -> ORT
    python3 -m nox -s imagenet_export       # evaluate + export + ORT-evaluate the last QAT checkpoint
    python3 -m nox -s imagenet_regression   # the default run compared with suites/imagenet/baselines.json

Extra arguments after ``--`` go to main.py (e.g. ``-- --data /imagenet -a resnet18 --pretrained``).
"""
import nox

run_py = globals().get("run_py")  # injected by the root noxfile
ROOT = globals().get("ROOT")


def _main():
    return str(ROOT / "suites" / "imagenet" / "main.py")


def _out():
    return ["--output-dir", str(ROOT / "checkpoint")]  # outputs in checkpoint/imagenet/; posargs may override


@nox.session
def imagenet_float_eval(session: nox.Session) -> None:
    """Float mobilenet_v2 on Fashion-MNIST (fine-tuned once, cached): top-1 on the 10k test set."""
    run_py(session, _main(), *_out(), "--not-qat", *session.posargs)


@nox.session
def imagenet_qat(session: nox.Session) -> None:
    """The embedded default end to end; metrics in checkpoint/imagenet/mobilenet_v2_metrics.json."""
    run_py(session, _main(), *_out(), *session.posargs)


@nox.session
def imagenet_export(session: nox.Session) -> None:
    """Export the last QAT checkpoint (checkpoint/imagenet/mobilenet_v2_checkpoint.pth, from imagenet_qat) to int8
    ONNX and evaluate it in onnxruntime; without that checkpoint, PTQ-calibrate the float model instead."""
    run_py(session, *export_command(session.posargs), *session.posargs)


def export_command(posargs) -> list[str]:
    """The export session's program and flags (also what `nox -s deploy_check -- imagenet` runs, plus --deploy)."""
    ckpt = ROOT / "checkpoint" / "imagenet" / "mobilenet_v2_checkpoint.pth"
    args = ["--evaluate"]
    if ckpt.exists() and "--resume" not in posargs:
        args += ["--resume", str(ckpt)]
    return [_main(), *_out(), *args]


@nox.session
def imagenet_regression(session: nox.Session) -> None:
    """The default run (float fine-tune reused from the cache) checked against baselines.json."""
    run_py(session, _main(), *_out(), "--baselines", str(ROOT / "suites" / "imagenet" / "baselines.json"),
           "--metrics", str(ROOT / "checkpoint" / "imagenet" / "regression_metrics.json"), *session.posargs)
