"""Pass 4 of export: check the file, run it in onnxruntime, count integer kernels, compare with PyTorch."""
from __future__ import annotations

import logging
import os
import platform
import tempfile
from collections import Counter

import numpy as np
import onnx

logger = logging.getLogger(__name__)

# Ops onnxruntime runs on integers after fusing QDQ groups (CPU provider).
INTEGER_KERNELS = frozenset({
    "QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QLinearConvTranspose", "QLinearAdd", "QLinearMul", "QLinearConcat",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "QLinearReduceMean", "QLinearWhere", "QLinearLeakyRelu",
})
# The subset that replaces a conv / linear / matmul layer.
INTEGER_MATMUL_KERNELS = frozenset({"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                                    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearConvTranspose"})


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has AVX512-VNNI or AVX-VNNI (None on other processors). Without it, onnxruntime's
    uint8 x int8 kernels add pairs of products in int16 with saturation, so full 8-bit int8 weights can be off."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags


def ort_session(path: str, optimize: bool = True, threads: int | None = None, optimized_path: str | None = None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        so.intra_op_num_threads = threads
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_in_batches(sess, x: np.ndarray, batch: int | None = None) -> list[np.ndarray]:
    """All outputs of a one-input model over ``x``, fed in chunks of the file's static batch size (``batch``, or the
    input's first dimension when it is fixed); a short last chunk is zero-padded and its padding cut off again."""
    inp = sess.get_inputs()[0]
    bs = batch or (inp.shape[0] if isinstance(inp.shape[0], int) else len(x)) or 1
    chunks = []
    for s in range(0, len(x), bs):
        c = x[s:s + bs]
        n = len(c)
        if n < bs:
            c = np.concatenate([c, np.zeros((bs - n, *c.shape[1:]), c.dtype)])
        chunks.append([o[:n] for o in sess.run(None, {inp.name: c})])
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))] if chunks else []


def interleaved_times(sessions: dict, feeds: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times (seconds) of ``repeats`` runs of each onnxruntime session on its feed, after ``warmup`` runs each.
    The sessions take turns run by run, so a noisy neighbour on the machine slows them alike and their ratio stays
    honest."""
    import time
    for _ in range(warmup):
        for k in sessions:
            sessions[k].run(None, feeds[k])
    times = {k: [] for k in sessions}
    for _ in range(repeats):
        for k in sessions:
            t = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append(time.perf_counter() - t)
    return times


def optimized_op_counts(path: str) -> Counter:
    """Op types of the graph onnxruntime actually runs (after ORT_ENABLE_ALL)."""
    with tempfile.TemporaryDirectory() as d:
        opt = os.path.join(d, "optimized.onnx")
        ort_session(path, optimized_path=opt)
        return Counter(n.op_type for n in onnx.load(opt).graph.node)


def count_integer_kernels(path: str) -> dict[str, int]:
    counts = optimized_op_counts(path)
    return {k: v for k, v in sorted(counts.items()) if k in INTEGER_KERNELS}


def run_onnx(path: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort_session(path)
    return sess.run(None, inputs)


def check_model(path: str) -> onnx.ModelProto:
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    return model
