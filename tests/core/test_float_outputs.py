"""float_outputs: Linear / matmul outputs that only float ops consume stay float (the ONNXRuntime backend's default),
and the exported file states every Linear bias as int32 + DequantizeLinear, so onnxruntime runs those layers as
integer kernels that write float (QGemm without an output scale, MatMulIntegerToFloat) instead of falling back to
float Gemm / MatMul."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from ts_qat_pytorch.fake_quantize import QuantizeBase
from ts_qat_pytorch.onnx.verify import optimized_op_counts
from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform

from .helpers import export_and_run, prepare_and_calibrate


class Block(nn.Module):
    """One attention + FFN block, post-LayerNorm, with every kind of consumer a Linear / matmul output can have."""

    def __init__(self, d=32, ff=64, heads=2, classes=5):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2, self.head = nn.Linear(d, ff), nn.Linear(ff, d), nn.Linear(d, classes)
        self.heads, self.dk = heads, d // heads

    def forward(self, x):
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, self.dk).transpose(1, 2)       # -> matmul: quantized output
        k = self.k(x).view(b, n, self.heads, self.dk).transpose(1, 2)
        v = self.v(x).view(b, n, self.heads, self.dk).transpose(1, 2)
        p = F.softmax(torch.matmul(q, k.transpose(2, 3)) * self.dk ** -0.5, dim=-1)  # matmul -> mul (quantized)
        ctx = torch.matmul(p, v).transpose(1, 2).reshape(b, n, d)
        x = self.ln1(F.layer_norm(self.o(ctx), (d,)) + x)                   # o -> LayerNorm: float output
        x = self.ln2(self.ff2(F.gelu(self.ff1(x))) + x)                      # ff1 -> GELU: float output
        return self.head(x[:, 0])                                           # head -> model output: float


def _inputs():
    torch.manual_seed(0)
    return (torch.randn(4, 16, 32),)


def _output_quantized(q) -> dict[str, bool]:
    """{layer: is its output fake-quantized?} for the Linear layers of a prepared Block."""
    out = {}
    for node in q.graph.nodes:
        if node.op == "call_module" and node.target in ("q", "k", "v", "o", "ff1", "ff2", "head"):
            out[node.target] = any(u.op == "call_module" and isinstance(q.get_submodule(u.target), QuantizeBase)
                                   for u in node.users)
    return out


def test_onnxruntime_backend_keeps_outputs_float_only_where_every_consumer_is_float():
    q = prepare_by_platform(Block().eval(), BackendType.ONNXRuntime)
    assert _output_quantized(q) == {"q": True, "k": True, "v": True, "o": False, "ff1": False, "ff2": True,
                                    "head": False}
    # the TSQAT backend (integer accelerators) quantizes every output; the key overrides either default
    assert all(_output_quantized(prepare_by_platform(Block().eval(), BackendType.TSQAT)).values())
    off = prepare_by_platform(Block().eval(), BackendType.ONNXRuntime, {"extra_quantizer_dict": {"float_outputs": False}})
    assert all(_output_quantized(off).values())
    on = prepare_by_platform(Block().eval(), BackendType.TSQAT, {"extra_quantizer_dict": {"float_outputs": True}})
    assert _output_quantized(on)["ff1"] is False


def test_float_outputs_export_to_integer_kernels_that_agree_with_fake_quant(tmp_path):
    inputs = _inputs()
    q = prepare_and_calibrate(Block().eval(), inputs, BackendType.ONNXRuntime)
    r, outs, ref = export_and_run(q, inputs, tmp_path / "block.onnx")
    ops = optimized_op_counts(r.onnx_path)
    # all 7 Linear layers and both matmuls run on integers; nothing falls back to float
    assert ops["QGemm"] + ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] == 9
    assert ops["Gemm"] == ops["MatMul"] == ops["FusedMatMul"] == 0
    # the head's output is float: rounding flips upstream (float sums in another order) move it a little
    d, size = np.abs(outs[0] - ref[0]), float(np.abs(ref[0]).max())
    assert d.max() <= 0.05 * size and d.mean() <= 0.01 * size


@pytest.mark.parametrize("backend", [BackendType.TSQAT, BackendType.ONNXRuntime])
def test_linear_biases_are_int32_on_the_input_times_weight_grid(backend, tmp_path):
    inputs = _inputs()
    q = prepare_and_calibrate(Block().eval(), inputs, backend)
    r, outs, ref = export_and_run(q, inputs, tmp_path / "block.onnx")
    m = onnx.load(r.onnx_path)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    dq_biases = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
                 and inits[n.input[0]].dtype == np.int32]
    assert len(dq_biases) == 7  # every Linear layer's bias
    # no float bias is left behind, and each int32 bias dequantizes to the bias the fake-quant model adds
    assert not any(f"{k}.bias" in inits for k in ("q", "k", "v", "o", "ff1", "ff2", "head"))
    for name in ("ff1", "head"):
        layer = q.get_submodule(name)
        grid = (layer.input_fake_quant.qparams()[0] * layer.weight_fake_quant.qparams()[0]).numpy()
        with torch.no_grad():
            from ts_qat_pytorch.nn.qat.modules import deployed_bias
            want = deployed_bias(layer, layer.bias).numpy()
        dq = next(n for n in dq_biases if n.input[0].startswith(f"{name}.bias"))
        got = inits[dq.input[0]].astype(np.float64) * inits[dq.input[1]]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(inits[dq.input[1]], grid, rtol=1e-6)
    assert float(np.abs(outs[0] - ref[0]).max()) <= 0.05 * float(np.abs(ref[0]).max())


def test_float_outputs_must_be_a_bool():
    with pytest.raises(ValueError, match="float_outputs"):
        prepare_by_platform(Block().eval(), BackendType.ONNXRuntime, {"extra_quantizer_dict": {"float_outputs": "yes"}})


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.word, self.pos = nn.Embedding(30000, 24), nn.Embedding(16, 24)  # too large for the exporter to fold
        self.fc = nn.Linear(24, 3)

    def forward(self, ids):
        return self.fc(F.layer_norm(self.word(ids) + self.pos.weight[: ids.shape[1]], (24,)))


@pytest.mark.parametrize("backend", [BackendType.TSQAT, BackendType.ONNXRuntime])
def test_embedding_rows_are_dequantized_after_the_lookup(backend, tmp_path):
    """Only the looked-up rows are dequantized (not the whole table on every run), with the same numbers; the
    table is stored as int8 integers (zero point 0), not as floats quantized at run time."""
    torch.manual_seed(0)
    ids = torch.randint(0, 30000, (4, 16))
    q = prepare_and_calibrate(Embed().eval(), (ids,), backend)
    r, outs, ref = export_and_run(q, (ids,), tmp_path / "embed.onnx")
    m = onnx.load(r.onnx_path)
    producer = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.op_type == "Gather" and n.input[0] in producer:
            assert producer[n.input[0]].op_type != "DequantizeLinear"  # integers are gathered, then dequantized
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "word.weight" for n in m.graph.node)
    table = next(i for i in m.graph.initializer if i.name == "word.weight")
    assert table.data_type == onnx.TensorProto.INT8
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] == "word.weight" for n in m.graph.node)
    np.testing.assert_allclose(outs[0], ref[0], atol=1e-4)


class AddOffset(nn.Module):
    """A float leaf that adds a constant vector (as a position bias would)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.linspace(-1.0, 1.0, 8))

    def forward(self, s):
        return F.softmax(s + self.offset, dim=-1)


class ScoresPlusConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.add = nn.Linear(16, 16), nn.Linear(16, 16), AddOffset()

    def forward(self, x):
        return self.add(torch.matmul(self.q(x), self.k(x).transpose(1, 2)))  # MatMul -> Add(constant) in the file


def test_only_layer_biases_become_int32(tmp_path):
    """A float constant added after an activation x activation matmul is not a bias on an int32 grid: it stays."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    q = prepare_and_calibrate(ScoresPlusConstant().eval(), (x,), BackendType.ONNXRuntime, {"leaf_module": [AddOffset]})
    r, outs, ref = export_and_run(q, (x,), tmp_path / "s.onnx")
    m = onnx.load(r.onnx_path)
    assert any(n.op_type == "MatMul" for n in m.graph.node)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    int32_biases = {n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear"
                    and n.input[0] in inits and inits[n.input[0]].dtype == np.int32}
    assert len(int32_biases) == 2  # q's and k's biases only
    assert np.abs(outs[0] - ref[0]).max() <= 0.05
