"""Deployment targets (ts_qat_pytorch.deploy): an exported file imported by rknn-toolkit2 and run in its NPU simulator.

rknn-toolkit2 lives in its own environment (`nox -s tests` and `nox -s deploy_check` make it and set
$TS_QAT_RKNN_PYTHON); without it the import tests are skipped and say why."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ts_qat_pytorch.deploy import DeployError, RknnSession, open_session

from .helpers import export_and_run, prepare_and_calibrate
from .test_export_storage import ConvNet

needs_rknn = pytest.mark.skipif(not os.environ.get("TS_QAT_RKNN_PYTHON"),
                                reason="no rknn-toolkit2 environment ($TS_QAT_RKNN_PYTHON; nox -s tests sets it)")


def _exported(tmp_path, **kw):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    q = prepare_and_calibrate(ConvNet().eval(), (x,))
    r, *_ = export_and_run(q, (x,), tmp_path / "net.onnx", **kw)
    return r.onnx_path


@needs_rknn
@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_rknn_imports_the_export_as_a_prequantized_model_and_agrees_with_onnxruntime(exporter, tmp_path):
    path = _exported(tmp_path, exporter=exporter)
    ref = open_session(path, "onnxruntime")
    with open_session(path, "rknn", platform="rk3588") as sess:
        assert [i.name for i in sess.get_inputs()] == [i.name for i in ref.get_inputs()]
        rng = np.random.default_rng(0)
        for _ in range(3):
            x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
            got, want = sess.run(None, {"x": x})[0], ref.run(None, {"x": x})[0]
            assert got.shape == want.shape
            # the NPU's integer arithmetic, not a float re-run: close to onnxruntime's integer kernels
            assert np.abs(got - want).max() <= 0.05 * np.ptp(want)


@needs_rknn
def test_a_dequantize_linear_without_zero_point_is_what_rknn_rejected(tmp_path):
    """The export's explicit zero points are what makes rknn-toolkit2 build the file: drop the one of an int32 bias
    (as exports before did) and its build stops, reported with the stage and the log."""
    import onnx
    path = _exported(tmp_path)
    m = onnx.load(path)
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("bias_int32"))
    del dq.input[2]
    old = str(tmp_path / "no_zero_point.onnx")
    onnx.save(m, old)
    open_session(old, "onnxruntime")  # valid ONNX: the zero point is optional
    with pytest.raises(DeployError, match=r"could not build .*no_zero_point.onnx.*IndexError") as e:
        RknnSession(old)
    assert os.path.isfile(str(tmp_path / "no_zero_point_rk3588.log")) and "its log" in str(e.value)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(DeployError, match="bad.onnx"):
        RknnSession(str(bad))


def test_without_an_rknn_environment_the_error_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv("TS_QAT_RKNN_PYTHON", raising=False)
    with pytest.raises(DeployError, match="nox -s deploy_check"):
        open_session(str(tmp_path / "m.onnx"), "rknn")
    monkeypatch.setenv("TS_QAT_RKNN_PYTHON", str(tmp_path / "nowhere" / "python"))
    with pytest.raises(DeployError, match="does not exist"):
        open_session(str(tmp_path / "m.onnx"), "rknn")
    with pytest.raises(ValueError, match="onnxruntime, rknn"):
        open_session(str(tmp_path / "m.onnx"), "tensorrt")
