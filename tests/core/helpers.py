"""Shared test helpers: the documented flow, end to end, on one model."""
from __future__ import annotations

import json

import numpy as np
import onnx
import torch

from ts_qat_pytorch.convert_export import convert_export
from ts_qat_pytorch.onnx.storage import quantized_tensors
from ts_qat_pytorch.onnx.verify import ort_session
from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
from ts_qat_pytorch.utils.state import enable_calibration, enable_quantization


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def prepare_and_calibrate(model, inputs, backend=BackendType.TSQAT, config=None, batches=2):
    q = prepare_by_platform(model, backend, config)
    q.eval()
    enable_calibration(q)
    with torch.no_grad():
        for _ in range(batches):
            q(*as_tuple(inputs))
    enable_quantization(q)
    return q


def export_and_run(q, inputs, path, **kw):
    """Export, run in onnxruntime, and return (result, ort outputs, torch outputs)."""
    inputs = as_tuple(inputs)
    r = convert_export(q, inputs, str(path), **kw)
    sess = ort_session(str(path))
    feeds = {n: a.numpy() for n, a in zip(r.input_names, inputs)}
    outs = sess.run(None, feeds)
    with torch.no_grad():
        ref = q(*inputs)
    ref = [t.numpy() for t in (ref if isinstance(ref, (tuple, list)) else [ref])]
    return r, outs, ref


def onnx_quantize_inputs(path) -> set[str]:
    """The tensors the file quantizes: activations entering a QuantizeLinear, integer weights."""
    return set(quantized_tensors(onnx.load(str(path))))


def qparams(path) -> dict:
    with open(path) as f:
        return json.load(f)


def max_steps(out: np.ndarray, ref: np.ndarray, scale: float | None) -> float:
    d = float(np.abs(out - ref).max()) if out.size else 0.0
    return d / scale if scale else d
