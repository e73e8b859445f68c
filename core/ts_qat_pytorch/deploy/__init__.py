"""Deployment targets of an exported QDQ file, each opened as an onnxruntime-like session (``get_inputs``,
``get_outputs``, ``run(output_names, feeds)``), so anything that evaluates an onnxruntime session evaluates the
file as the target runs it.

    open_session("model.onnx", "onnxruntime")     # onnxruntime, CPU, all graph optimisations (integer kernels)
    open_session("model.onnx", "rknn")            # rknn-toolkit2: imported as a pre-quantized model, NPU simulator
"""
from __future__ import annotations

from .rknn import DeployError, RknnSession, find_python

TARGETS = ("onnxruntime", "rknn")

__all__ = ["TARGETS", "open_session", "close_session", "DeployError", "RknnSession", "find_python"]


def open_session(path: str, target: str, threads: int | None = None, **options):
    """The file as ``target`` runs it. rknn options: ``platform`` (default "rk3588"), ``optimization_level``,
    ``python`` (the interpreter with rknn-toolkit2; default $TS_QAT_RKNN_PYTHON)."""
    if target == "onnxruntime":
        from ..onnx.verify import ort_session
        return ort_session(path, threads=threads)
    if target == "rknn":
        return RknnSession(path, **options)
    raise ValueError(f"unknown deployment target {target!r}; choose one of {', '.join(TARGETS)}")


def close_session(session) -> None:
    close = getattr(session, "close", None)
    if callable(close):
        close()
