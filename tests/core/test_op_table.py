"""One parametrized case per operator-table row and spelling: traced, quantized where the table says,
exported, run in onnxruntime, and in agreement with the PyTorch fake-quant forward."""
from __future__ import annotations

import operator

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ts_qat_pytorch.fake_quantize import QuantizeBase
from ts_qat_pytorch.quantization.op_table import (FLOAT_WARN, INDEX, OP_TABLE, PASSTHROUGH, QUANTIZED,
                                                  markdown_table)

from .helpers import export_and_run, onnx_quantize_inputs, prepare_and_calibrate


class Wrap(nn.Module):
    """conv -> op -> conv, so the op sits between quantized layers as in a real network."""

    def __init__(self, fn, c=4, out_c=None, tail=True):
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.fn = fn
        self.tail = nn.Conv2d(out_c or c, 4, 1) if tail else None

    def forward(self, x):
        y = self.fn(self.head(x))
        return self.tail(y) if self.tail is not None else y


class Mod(nn.Module):
    def __init__(self, mod, tail_c=None):
        super().__init__()
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.mod = mod
        self.tail = nn.Conv2d(tail_c, 4, 1) if tail_c else None

    def forward(self, x):
        y = self.mod(self.head(x))
        return self.tail(y) if self.tail is not None else y


class Seq1d(nn.Module):
    def __init__(self, mod, tail_c=None):
        super().__init__()
        self.head = nn.Conv1d(3, 4, 3, padding=1)
        self.mod = mod
        self.tail = nn.Conv1d(tail_c, 4, 1) if tail_c else None

    def forward(self, x):
        y = self.mod(self.head(x))
        return self.tail(y) if self.tail is not None else y


class FunctionalWeights(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        shapes = {"conv1d": (4, 3, 3), "conv2d": (4, 3, 3, 3), "linear": (4, 8), "conv_transpose1d": (3, 4, 3),
                  "conv_transpose2d": (3, 4, 3, 3)}
        self.w = nn.Parameter(torch.randn(shapes[kind]) * 0.3)
        self.b = nn.Parameter(torch.randn(4) * 0.1)

    def forward(self, x):
        return getattr(F, self.kind)(x, self.w, self.b)


class TwoInputs(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.a(x), self.b(x))


class EmbedModel(nn.Module):
    def __init__(self, functional=False):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.functional = functional
        self.fc = nn.Linear(8, 4)

    def forward(self, ids):
        e = F.embedding(ids, self.emb.weight) if self.functional else self.emb(ids)
        return self.fc(e)


class RoIModel(nn.Module):
    def __init__(self):
        super().__init__()
        from torchvision.ops import RoIPool
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = RoIPool((2, 2), 1.0)
        self.fc = nn.Linear(16, 4)

    def forward(self, x, boxes):
        return self.fc(torch.flatten(self.pool(self.head(x), boxes), 1))


class RNNModel(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.fc0 = nn.Linear(6, 8)
        self.rnn = cls(8, 8, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y, _ = self.rnn(self.fc0(x))
        return self.fc(y)


IMG = (2, 3, 8, 8)
SEQ = (2, 3, 8)

# row name -> [(case id, model factory, input factory)]
CASES = {
    "Conv1d/Conv2d": [("nn.Conv2d", lambda: Mod(nn.Conv2d(4, 4, 3)), IMG),
                      ("nn.Conv1d", lambda: Seq1d(nn.Conv1d(4, 4, 3)), SEQ),
                      ("F.conv2d", lambda: FunctionalWeights("conv2d"), IMG),
                      ("F.conv1d", lambda: FunctionalWeights("conv1d"), SEQ)],
    "ConvTranspose1d/2d": [("nn.ConvTranspose2d", lambda: Mod(nn.ConvTranspose2d(4, 4, 2, stride=2)), IMG),
                           ("nn.ConvTranspose1d", lambda: Seq1d(nn.ConvTranspose1d(4, 4, 2, stride=2)), SEQ),
                           ("F.conv_transpose2d", lambda: FunctionalWeights("conv_transpose2d"), IMG)],
    "Linear": [("nn.Linear", lambda: Mod(nn.Linear(8, 4)), IMG),
               ("F.linear", lambda: FunctionalWeights("linear"), (2, 5, 8))],
    "MaxPool1d/2d": [("nn.MaxPool2d", lambda: Mod(nn.MaxPool2d(2), 4), IMG),
                     ("F.max_pool2d", lambda: Wrap(lambda t: F.max_pool2d(t, 2)), IMG),
                     ("nn.MaxPool1d", lambda: Seq1d(nn.MaxPool1d(2), 4), SEQ)],
    "AdaptiveAvgPool1d/2d": [("nn.AdaptiveAvgPool2d", lambda: Mod(nn.AdaptiveAvgPool2d(1), 4), IMG),
                             ("F.adaptive_avg_pool2d", lambda: Wrap(lambda t: F.adaptive_avg_pool2d(t, 1)), IMG),
                             ("nn.AdaptiveAvgPool1d", lambda: Seq1d(nn.AdaptiveAvgPool1d(1), 4), SEQ)],
    "BatchNorm1d/2d": [("nn.BatchNorm2d", lambda: Wrap(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4))), IMG),
                       ("nn.BatchNorm1d", lambda: Seq1d(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4)), 4), SEQ)],
    "ReLU": [("nn.ReLU", lambda: Mod(nn.ReLU(), 4), IMG), ("F.relu", lambda: Wrap(F.relu), IMG),
             ("torch.relu", lambda: Wrap(torch.relu), IMG), ("Tensor.relu", lambda: Wrap(lambda t: t.relu()), IMG)],
    "PReLU": [("nn.PReLU", lambda: Mod(nn.PReLU(), 4), IMG)],
    "Upsample/interpolate": [("nn.Upsample", lambda: Mod(nn.Upsample(scale_factor=2), 4), IMG),
                             ("F.interpolate", lambda: Wrap(lambda t: F.interpolate(t, scale_factor=2.0, mode="bilinear")), IMG)],
    "AvgPool1d/2d": [("nn.AvgPool2d", lambda: Mod(nn.AvgPool2d(2), 4), IMG),
                     ("F.avg_pool2d", lambda: Wrap(lambda t: F.avg_pool2d(t, 2)), IMG),
                     ("nn.AvgPool1d", lambda: Seq1d(nn.AvgPool1d(2), 4), SEQ)],
    "LeakyReLU": [("nn.LeakyReLU", lambda: Mod(nn.LeakyReLU(0.1), 4), IMG),
                  ("F.leaky_relu", lambda: Wrap(lambda t: F.leaky_relu(t, 0.1)), IMG)],
    "Tanh": [("nn.Tanh", lambda: Mod(nn.Tanh(), 4), IMG), ("torch.tanh", lambda: Wrap(torch.tanh), IMG),
             ("Tensor.tanh", lambda: Wrap(lambda t: t.tanh()), IMG)],
    "Sigmoid": [("nn.Sigmoid", lambda: Mod(nn.Sigmoid(), 4), IMG), ("torch.sigmoid", lambda: Wrap(torch.sigmoid), IMG),
                ("Tensor.sigmoid", lambda: Wrap(lambda t: t.sigmoid()), IMG)],
    "ReLU6": [("nn.ReLU6", lambda: Mod(nn.ReLU6(), 4), IMG), ("F.relu6", lambda: Wrap(F.relu6), IMG)],
    "ELU": [("nn.ELU", lambda: Mod(nn.ELU(), 4), IMG), ("F.elu", lambda: Wrap(F.elu), IMG)],
    "SELU": [("nn.SELU", lambda: Mod(nn.SELU(), 4), IMG), ("torch.selu", lambda: Wrap(torch.selu), IMG)],
    "flatten": [("torch.flatten", lambda: Wrap(lambda t: torch.flatten(t, 1), tail=False), IMG),
                ("Tensor.flatten", lambda: Wrap(lambda t: t.flatten(2), tail=False), IMG),
                ("nn.Flatten", lambda: Mod(nn.Flatten()), IMG)],
    "Softmax": [("nn.Softmax", lambda: Mod(nn.Softmax(dim=1), 4), IMG),
                ("F.softmax", lambda: Wrap(lambda t: F.softmax(t, dim=-1)), IMG),
                ("Tensor.softmax", lambda: Wrap(lambda t: t.softmax(-1)), IMG)],
    "cat": [("torch.cat", lambda: TwoInputs(lambda a, b: torch.cat([a, b], 1)), IMG)],
    "split": [("torch.split", lambda: Wrap(lambda t: torch.split(t, 2, 1)[0], out_c=2), IMG),
              ("Tensor.split", lambda: Wrap(lambda t: t.split(2, 1)[1], out_c=2), IMG)],
    "repeat": [("Tensor.repeat", lambda: Wrap(lambda t: t.repeat(1, 2, 1, 1), out_c=8), IMG)],
    "add": [("operator.add", lambda: TwoInputs(operator.add), IMG), ("torch.add", lambda: TwoInputs(torch.add), IMG),
            ("Tensor.add", lambda: TwoInputs(lambda a, b: a.add(b)), IMG)],
    "mul": [("operator.mul", lambda: TwoInputs(operator.mul), IMG), ("torch.mul", lambda: TwoInputs(torch.mul), IMG),
            ("Tensor.mul", lambda: TwoInputs(lambda a, b: a.mul(b)), IMG)],
    "abs": [("torch.abs", lambda: Wrap(torch.abs), IMG), ("Tensor.abs", lambda: Wrap(lambda t: t.abs()), IMG)],
    "sqrt": [("torch.sqrt", lambda: Wrap(lambda t: torch.sqrt(t.abs() + 1)), IMG)],
    "exp": [("torch.exp", lambda: Wrap(lambda t: torch.exp(t * 0.1)), IMG)],
    "pow": [("torch.pow", lambda: Wrap(lambda t: torch.pow(t, 2)), IMG), ("operator.pow", lambda: Wrap(lambda t: t ** 2), IMG)],
    "log": [("torch.log", lambda: Wrap(lambda t: torch.log(t.abs() + 1)), IMG)],
    "sin": [("torch.sin", lambda: Wrap(torch.sin), IMG)],
    "cos": [("torch.cos", lambda: Wrap(torch.cos), IMG)],
    "slicing": [("getitem", lambda: Wrap(lambda t: t[:, :2, 1:, :-1], out_c=2), IMG)],
    "transpose": [("torch.transpose", lambda: Wrap(lambda t: torch.transpose(t, 2, 3)), IMG),
                  ("Tensor.transpose", lambda: Wrap(lambda t: t.transpose(2, 3)), IMG)],
    "view": [("Tensor.view", lambda: Wrap(lambda t: t.view(t.size(0), 4, -1, 2), tail=True), IMG)],
    "squeeze": [("torch.squeeze", lambda: Wrap(lambda t: torch.squeeze(t[:, :, :1], 2), tail=False), IMG)],
    "unsqueeze": [("torch.unsqueeze", lambda: Wrap(lambda t: torch.unsqueeze(t, 0), tail=False), IMG)],
    "GLU": [("nn.GLU", lambda: Mod(nn.GLU(dim=1), 2), IMG), ("F.glu", lambda: Wrap(lambda t: F.glu(t, 1), out_c=2), IMG)],
    "stack": [("torch.stack", lambda: TwoInputs(lambda a, b: torch.stack([a, b], 1)), IMG)],
    "chunk": [("torch.chunk", lambda: Wrap(lambda t: torch.chunk(t, 2, 1)[0], out_c=2), IMG),
              ("Tensor.chunk", lambda: Wrap(lambda t: t.chunk(2, 1)[1], out_c=2), IMG)],
    "mean": [("torch.mean", lambda: Wrap(lambda t: torch.mean(t, (2, 3), keepdim=True)), IMG),
             ("Tensor.mean", lambda: Wrap(lambda t: t.mean(-1, keepdim=True)), IMG)],
    "sub": [("operator.sub", lambda: TwoInputs(operator.sub), IMG), ("torch.sub", lambda: TwoInputs(torch.sub), IMG)],
    "min": [("torch.min(a,b)", lambda: TwoInputs(torch.min), IMG),
            ("Tensor.min(dim)", lambda: Wrap(lambda t: t.min(1, keepdim=True)[0], out_c=1), IMG)],
    "max": [("torch.max(a,b)", lambda: TwoInputs(torch.max), IMG),
            ("Tensor.max(dim)", lambda: Wrap(lambda t: t.max(1, keepdim=True)[0], out_c=1), IMG)],
    "pad": [("nn.ZeroPad2d", lambda: Mod(nn.ZeroPad2d((0, 1, 0, 1)), 4), IMG),
            ("F.pad", lambda: Wrap(lambda t: F.pad(t, [1, 1, 1, 1])), IMG)],
    "PixelShuffle": [("nn.PixelShuffle", lambda: Mod(nn.PixelShuffle(2), 1), IMG)],
    "LayerNorm": [("nn.LayerNorm", lambda: Mod(nn.LayerNorm(8), 4), IMG),
                  ("F.layer_norm", lambda: Wrap(lambda t: F.layer_norm(t, (8,))), IMG)],
    "Hardswish": [("nn.Hardswish", lambda: Mod(nn.Hardswish(), 4), IMG)],
    "Hardsigmoid": [("nn.Hardsigmoid", lambda: Mod(nn.Hardsigmoid(), 4), IMG)],
    "clamp": [("torch.clamp", lambda: Wrap(lambda t: torch.clamp(t, -0.5, 0.5)), IMG),
              ("Tensor.clamp", lambda: Wrap(lambda t: t.clamp(min=0.0)), IMG)],
    "argmax": [("torch.argmax", lambda: Wrap(lambda t: torch.argmax(t, 1), tail=False), IMG)],
    "Embedding": [("nn.Embedding", lambda: EmbedModel(), "ids"), ("F.embedding", lambda: EmbedModel(True), "ids")],
    "SiLU": [("nn.SiLU", lambda: Mod(nn.SiLU(), 4), IMG), ("F.silu", lambda: Wrap(F.silu), IMG)],
    "RoIPool": [("torchvision.ops.RoIPool", RoIModel, "roi")],
    "matmul": [("torch.matmul", lambda: TwoInputs(lambda a, b: torch.matmul(a, b.transpose(-1, -2))), IMG),
               ("operator.matmul", lambda: TwoInputs(lambda a, b: a @ b), IMG),
               ("Tensor.matmul", lambda: TwoInputs(lambda a, b: a.matmul(b)), IMG)],
    "GELU": [("nn.GELU", lambda: Mod(nn.GELU(), 4), IMG), ("F.gelu", lambda: Wrap(F.gelu), IMG)],
    "PixelUnshuffle": [("nn.PixelUnshuffle", lambda: Mod(nn.PixelUnshuffle(2), 16), IMG)],
    "tile": [("torch.tile", lambda: Wrap(lambda t: torch.tile(t, (1, 2, 1, 1)), out_c=8), IMG)],
    "Tensor.to": [("Tensor.to", lambda: Wrap(lambda t: t.to(torch.float32)), IMG),
                  ("Tensor.contiguous", lambda: Wrap(lambda t: t.contiguous()), IMG)],
    "permute": [("Tensor.permute", lambda: Wrap(lambda t: t.permute(0, 1, 3, 2)), IMG),
                ("torch.permute", lambda: Wrap(lambda t: torch.permute(t, (0, 1, 3, 2))), IMG)],
    "reshape": [("Tensor.reshape", lambda: Wrap(lambda t: t.reshape(2, 4, 4, 16)), IMG),
                ("torch.reshape", lambda: Wrap(lambda t: torch.reshape(t, (2, 4, 16, 4))), IMG)],
    "roll": [("torch.roll", lambda: Wrap(lambda t: torch.roll(t, 1, 2)), IMG),
             ("Tensor.roll", lambda: Wrap(lambda t: t.roll(1, 3)), IMG)],
    "RNN/LSTM/GRU": [("nn.LSTM", lambda: RNNModel(nn.LSTM), (2, 5, 6)), ("nn.GRU", lambda: RNNModel(nn.GRU), (2, 5, 6)),
                     ("nn.RNN", lambda: RNNModel(nn.RNN), (2, 5, 6))],
    "Dropout/Identity": [("nn.Dropout", lambda: Mod(nn.Dropout(0.1), 4), IMG)],
}

# The first spelling of each row goes through the default (dynamo) exporter; the other spellings of the
# same row use the legacy exporter, which takes a tenth of the time (both are supported paths).
PARAMS = [pytest.param(row, *case, "dynamo" if i == 0 else "legacy", id=f"{row}-{case[0]}")
          for row in CASES for i, case in enumerate(CASES[row])]


def _inputs(spec):
    g = torch.Generator().manual_seed(1)
    if spec == "ids":
        return (torch.randint(0, 20, (2, 6), generator=g),)
    if spec == "roi":
        boxes = torch.tensor([[0, 0.0, 0.0, 4.0, 4.0], [1, 2.0, 2.0, 7.0, 7.0]])
        return (torch.randn(2, 3, 8, 8, generator=g), boxes)
    return (torch.randn(*spec, generator=g),)


def test_every_table_row_has_a_case():
    assert {r.name for r in OP_TABLE} == set(CASES)
    assert "| Conv1d/Conv2d | quantized |" in markdown_table()


@pytest.mark.parametrize("row,case_id,factory,spec,exporter", PARAMS)
def test_operator_row(row, case_id, factory, spec, exporter, tmp_path, caplog):
    treatment = next(r.treatment for r in OP_TABLE if r.name == row)
    model = factory().eval()
    inputs = _inputs(spec)
    q = prepare_and_calibrate(model, inputs)
    if treatment == FLOAT_WARN:
        assert any("stays float" in r.message for r in caplog.records)
    # the op survives tracing and the quantized model still computes roughly the float function
    with torch.no_grad():
        ref = model(*inputs)
        out = q(*inputs)
    if ref.is_floating_point():
        assert out.shape == ref.shape
        assert torch.isfinite(out).all()
    n_quantizers = sum(isinstance(m, QuantizeBase) for m in q.modules())
    assert n_quantizers >= 1
    r, ort_out, torch_out = export_and_run(q, inputs, tmp_path / "m.onnx", exporter=exporter)
    # torchvision's roi_pool has no translation in the current exporter: export falls back to legacy
    assert r.exporter == ("legacy" if row == "RoIPool" else exporter)
    onnx.checker.check_model(onnx.load(r.onnx_path))
    for o, t in zip(ort_out, torch_out):
        assert o.shape == t.shape
        if treatment == INDEX:
            assert (o == t).mean() >= 0.9
        else:
            scale = r.output_scale[0] or float(np.abs(t).max() / 127 + 1e-6)
            assert np.abs(o - t).max() <= 2.01 * scale, f"ORT differs from fake-quant by >2 steps ({case_id})"
    ops = [n.op_type for n in onnx.load(r.onnx_path).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    if treatment in (QUANTIZED, PASSTHROUGH) and row not in ("RoIPool",):
        # every weight and every quantized tensor is in the JSON, under its ONNX name
        names = onnx_quantize_inputs(r.onnx_path)
        import json
        with open(r.qparams_path) as f:
            assert set(json.load(f)["tensors"]) <= names


def test_docs_table_is_in_sync():
    import pathlib
    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "operators.md").read_text()
    assert markdown_table() in doc, "regenerate docs/operators.md (see its header)"
