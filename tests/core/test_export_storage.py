"""How the exported file stores a quantized model: the convention deployment toolchains import
(integer weights read by DequantizeLinear, explicit zero points, parameters as initializers)."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from ts_qat_pytorch.onnx import verify

from .helpers import export_and_run, prepare_and_calibrate


class ConvNet(nn.Module):
    """conv-BN-ReLU x2 with a residual add, pooling and a linear layer (the net rknn-toolkit2 rejected)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c2, self.b2 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        z = torch.relu(self.b2(self.c2(y))) + y
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(z, 1), 1))


def _export(tmp_path, exporter="dynamo", **kw):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    q = prepare_and_calibrate(ConvNet().eval(), (x,))
    r, outs, ref = export_and_run(q, (x,), tmp_path / "net.onnx", exporter=exporter, **kw)
    return r, onnx.load(r.onnx_path), outs, ref


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_weights_are_int8_initializers_read_by_dequantize_linear(exporter, tmp_path):
    r, m, outs, ref = _export(tmp_path, exporter)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    # no weight is quantized at run time: every QuantizeLinear reads an activation
    assert not [n.name for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits]
    for layer in ("c1", "c2", "fc"):
        w = inits[f"{layer}.weight"]
        assert w.dtype == np.int8 and np.abs(w).max() == 127  # the scheme's symmetric integers
        dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{layer}.weight"]
        assert len(dq) == 1 and not np.any(inits[dq[0].input[2]])  # zero point 0, stated
    # conv and linear biases are int32 on the input x weight scale grid
    for node in m.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            bias_dq = producer[node.input[2]]
            assert bias_dq.op_type == "DequantizeLinear" and inits[bias_dq.input[0]].dtype == np.int32
    # every Q / DQ names its zero point (rknn-toolkit2 indexes it), parameters are initializers
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert len(n.input) == 3 and n.input[1] in inits and n.input[2] in inits, n.name
    assert not [n for n in m.graph.node if n.op_type in ("Constant", "Identity")]
    # a quarter of float storage: 32-bit float weights would be 4x the int8 bytes
    float_bytes = 4 * sum(v.size for k, v in inits.items() if k.endswith(".weight"))
    assert sum(v.nbytes for v in inits.values()) < 0.4 * float_bytes
    assert r.integer_matmul_kernels == 3
    np.testing.assert_allclose(outs[0], ref[0], atol=1e-5)


def test_uint8_weight_storage_is_an_explicit_option(tmp_path):
    r, m, outs, ref = _export(tmp_path, weight_dtype="uint8")
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "c2.weight")
    assert inits["c2.weight"].dtype == np.uint8 and set(np.unique(inits[dq.input[2]])) == {128}
    np.testing.assert_allclose(outs[0], ref[0], atol=1e-5)


def test_verification_names_the_uint8_option_on_a_cpu_that_saturates(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(verify, "cpu_has_vnni", lambda: False)
    with caplog.at_level(logging.WARNING, logger="ts_qat_pytorch"):
        r, *_ = _export(tmp_path)
    assert r.cpu_may_saturate
    assert any("weight_dtype='uint8'" in rec.getMessage() and "VNNI" in rec.getMessage() for rec in caplog.records)
    caplog.clear()
    monkeypatch.setattr(verify, "cpu_has_vnni", lambda: True)
    with caplog.at_level(logging.WARNING, logger="ts_qat_pytorch"):
        r, *_ = _export(tmp_path)
    assert not r.cpu_may_saturate and not any("VNNI" in rec.getMessage() for rec in caplog.records)


class LinearOn3D(nn.Module):
    """Linears on a (batch, tokens, features) tensor: torch's exporter writes MatMul(x, Transpose(W))."""

    def __init__(self):
        super().__init__()
        self.ln, self.fc, self.out = nn.LayerNorm(32), nn.Linear(32, 48), nn.Linear(48, 8)

    def forward(self, x):
        return self.out(torch.relu(self.fc(self.ln(x))))


def test_matmul_weights_are_stored_as_the_matmul_reads_them(tmp_path):
    """No Transpose between a weight's DequantizeLinear and its MatMul (rknn-toolkit2 took the transposed tensor for
    a float16 weight); the per-channel axis moves with the layout, and the JSON says how the file stores it."""
    import json
    torch.manual_seed(0)
    x = torch.randn(1, 16, 32)
    q = prepare_and_calibrate(LinearOn3D().eval(), (x,))
    r, outs, ref = export_and_run(q, (x,), tmp_path / "lin.onnx")
    m = onnx.load(r.onnx_path)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    matmuls = [n for n in m.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2
    for mm in matmuls:
        dq = producer[mm.input[1]]
        assert dq.op_type == "DequantizeLinear" and dq.input[0] in inits
        assert next(a.i for a in dq.attribute if a.name == "axis") == 1
    assert inits["fc.weight"].shape == (32, 48) and inits["fc.weight"].dtype == np.int8
    with open(r.qparams_path) as f:
        w = json.load(f)["tensors"]["fc.weight"]
    assert (w["axis"], w["onnx_axis"], w["onnx_shape"]) == (0, 1, [32, 48])
    assert not [n for n in m.graph.node if n.op_type == "Transpose"]
    np.testing.assert_allclose(outs[0], ref[0], atol=1e-5)
