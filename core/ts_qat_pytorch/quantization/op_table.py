"""The supported-operator table: how each traced operation is treated for integer deployment.

Treatments
    quantized    inputs and output pass through fake quantizers (QDQ in ONNX), so the deployed op runs
                 as an integer kernel (conv, linear, matmul, add, concat, pooling that averages, ...).
    passthrough  runs directly on integers and keeps its input's scale and zero point (max pooling,
                 reshapes, slicing, ReLU, ...). A consumer that needs a quantized input re-uses the
                 producer's quantizer, so the deployed graph stays integer across it.
    float        runs in float between DequantizeLinear and the next QuantizeLinear (transcendental
                 and normalisation ops: exp, softmax, LayerNorm, GELU, ...). Its output is quantized
                 where a quantized consumer needs it.
    index        produces integers or shapes (argmax, size): never quantized.
    float_warn   kept float with a warning naming the layer (RNN, LSTM, GRU).

A passthrough op with two or more tensor inputs (``torch.min(a, b)``) is treated as quantized: its
inputs may sit on different grids.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .canonical import SamePad2d

QUANTIZED, PASSTHROUGH, FLOAT, INDEX, FLOAT_WARN = "quantized", "passthrough", "float", "index", "float_warn"


@dataclass(frozen=True)
class OpRow:
    name: str
    treatment: str
    modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    note: str = ""
    weighted: bool = False  # has a weight quantized per output channel


def _roi_pool_types() -> tuple[type, ...]:
    try:
        from torchvision.ops import RoIPool
        return (RoIPool,)
    except Exception:  # torchvision is optional for the core
        return ()


def _roi_pool_fns() -> tuple[Callable, ...]:
    try:
        from torchvision.ops import roi_pool
        return (roi_pool,)
    except Exception:
        return ()


OP_TABLE: tuple[OpRow, ...] = (
    OpRow("Conv1d/Conv2d", QUANTIZED, (nn.Conv1d, nn.Conv2d), (F.conv1d, F.conv2d), weighted=True),
    OpRow("ConvTranspose1d/2d", QUANTIZED, (nn.ConvTranspose1d, nn.ConvTranspose2d),
          (F.conv_transpose1d, F.conv_transpose2d), weighted=True),
    OpRow("Linear", QUANTIZED, (nn.Linear,), (F.linear,), weighted=True),
    OpRow("MaxPool1d/2d", PASSTHROUGH, (nn.MaxPool1d, nn.MaxPool2d), (F.max_pool1d, F.max_pool2d)),
    OpRow("AdaptiveAvgPool1d/2d", QUANTIZED, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d),
          (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)),
    OpRow("BatchNorm1d/2d", QUANTIZED, (nn.BatchNorm1d, nn.BatchNorm2d), (F.batch_norm,),
          note="folded into the preceding conv/linear when there is one"),
    OpRow("ReLU", PASSTHROUGH, (nn.ReLU,), (F.relu, torch.relu, F.relu_, torch.relu_), ("relu", "relu_"),
          note="fused into the preceding layer's output quantizer"),
    OpRow("PReLU", FLOAT, (nn.PReLU,), (F.prelu,)),
    OpRow("Upsample/interpolate", QUANTIZED, (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
          (F.interpolate, F.upsample)),
    OpRow("AvgPool1d/2d", QUANTIZED, (nn.AvgPool1d, nn.AvgPool2d), (F.avg_pool1d, F.avg_pool2d)),
    OpRow("LeakyReLU", QUANTIZED, (nn.LeakyReLU,), (F.leaky_relu,)),
    OpRow("Tanh", FLOAT, (nn.Tanh,), (torch.tanh, F.tanh), ("tanh",)),
    OpRow("Sigmoid", QUANTIZED, (nn.Sigmoid,), (torch.sigmoid, F.sigmoid), ("sigmoid",)),
    OpRow("ReLU6", PASSTHROUGH, (nn.ReLU6, nn.Hardtanh), (F.relu6, F.hardtanh),
          note="fused into the preceding layer's output quantizer (its scale is capped at 6/255)"),
    OpRow("ELU", FLOAT, (nn.ELU,), (F.elu,)),
    OpRow("SELU", FLOAT, (nn.SELU,), (F.selu, torch.selu)),
    OpRow("flatten", PASSTHROUGH, (nn.Flatten,), (torch.flatten,), ("flatten",)),
    OpRow("Softmax", FLOAT, (nn.Softmax,), (F.softmax, torch.softmax), ("softmax",)),
    OpRow("cat", QUANTIZED, (), (torch.cat, torch.concat),
          note="inputs and output share one quantizer where the backend has shared_concat_scales (TSQAT)"),
    OpRow("split", PASSTHROUGH, (), (torch.split,), ("split",)),
    OpRow("repeat", PASSTHROUGH, (), (), ("repeat",)),
    OpRow("add", QUANTIZED, (), (operator.add, operator.iadd, torch.add), ("add", "add_")),
    OpRow("mul", QUANTIZED, (), (operator.mul, operator.imul, torch.mul), ("mul", "mul_")),
    OpRow("abs", FLOAT, (), (torch.abs, operator.abs), ("abs",)),
    OpRow("sqrt", FLOAT, (), (torch.sqrt,), ("sqrt",)),
    OpRow("exp", FLOAT, (), (torch.exp,), ("exp",)),
    OpRow("pow", FLOAT, (), (torch.pow, operator.pow), ("pow",)),
    OpRow("log", FLOAT, (), (torch.log,), ("log",)),
    OpRow("sin", FLOAT, (), (torch.sin,), ("sin",)),
    OpRow("cos", FLOAT, (), (torch.cos,), ("cos",)),
    OpRow("slicing", PASSTHROUGH, (), (operator.getitem,)),
    OpRow("transpose", PASSTHROUGH, (), (torch.transpose,), ("transpose",)),
    OpRow("view", PASSTHROUGH, (), (), ("view",)),
    OpRow("squeeze", PASSTHROUGH, (), (torch.squeeze,), ("squeeze",)),
    OpRow("unsqueeze", PASSTHROUGH, (), (torch.unsqueeze,), ("unsqueeze",)),
    OpRow("GLU", FLOAT, (nn.GLU,), (F.glu,)),
    OpRow("stack", QUANTIZED, (), (torch.stack,)),
    OpRow("chunk", PASSTHROUGH, (), (torch.chunk,), ("chunk",)),
    OpRow("mean", QUANTIZED, (), (torch.mean,), ("mean",)),
    OpRow("sub", QUANTIZED, (), (operator.sub, operator.isub, torch.sub), ("sub",)),
    OpRow("min", PASSTHROUGH, (), (torch.min,), ("min",), note="reduction; with dim, indices are not quantized"),
    OpRow("max", PASSTHROUGH, (), (torch.max,), ("max",), note="reduction; with dim, indices are not quantized"),
    OpRow("pad", PASSTHROUGH, (SamePad2d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d), (F.pad,),
          note="zero padding is the zero point, exactly on the grid"),
    OpRow("PixelShuffle", PASSTHROUGH, (nn.PixelShuffle,), (F.pixel_shuffle,)),
    OpRow("LayerNorm", FLOAT, (nn.LayerNorm,), (F.layer_norm,)),
    OpRow("Hardswish", FLOAT, (nn.Hardswish,), (F.hardswish,)),
    OpRow("Hardsigmoid", FLOAT, (nn.Hardsigmoid,), (F.hardsigmoid,)),
    OpRow("clamp", PASSTHROUGH, (), (torch.clamp, torch.clip), ("clamp", "clip")),
    OpRow("argmax", INDEX, (), (torch.argmax,), ("argmax",)),
    OpRow("Embedding", FLOAT, (nn.Embedding,), (F.embedding,), weighted=True,
          note="table quantized per row; the gathered rows are re-quantized by their consumer"),
    OpRow("SiLU", FLOAT, (nn.SiLU,), (F.silu,)),
    OpRow("RoIPool", PASSTHROUGH, _roi_pool_types(), _roi_pool_fns(), note="boxes are not quantized"),
    OpRow("matmul", QUANTIZED, (), (torch.matmul, operator.matmul, torch.bmm), ("matmul", "bmm")),
    OpRow("GELU", FLOAT, (nn.GELU,), (F.gelu,)),
    OpRow("PixelUnshuffle", PASSTHROUGH, (nn.PixelUnshuffle,), (F.pixel_unshuffle,)),
    OpRow("tile", PASSTHROUGH, (), (torch.tile,), ("tile",)),
    OpRow("Tensor.to", PASSTHROUGH, (), (), ("to", "contiguous", "float")),
    OpRow("permute", PASSTHROUGH, (), (torch.permute,), ("permute",)),
    OpRow("reshape", PASSTHROUGH, (), (torch.reshape,), ("reshape",)),
    OpRow("roll", PASSTHROUGH, (), (torch.roll,), ("roll",)),
    OpRow("RNN/LSTM/GRU", FLOAT_WARN, (nn.RNN, nn.LSTM, nn.GRU)),
    OpRow("Dropout/Identity", PASSTHROUGH, (nn.Dropout, nn.Identity), (F.dropout,)),
)

# Operations whose results are Python values or shapes, never float tensors.
SHAPE_METHODS = frozenset({"size", "dim", "numel", "tolist", "item", "type", "__len__"})
SHAPE_FUNCTIONS = (getattr, len)

# ReLU-like activations whose output quantizer absorbs them (one deployed kernel).
FUSABLE_ACT_FUNCTIONS = (F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.hardtanh)
FUSABLE_ACT_METHODS = ("relu", "relu_")
BOUNDED_ACT_MAX = {nn.ReLU6: 6.0, F.relu6: 6.0}


@dataclass
class OpIndex:
    """Lookup from module type / function / method name to an :class:`OpRow`."""

    modules: dict[type, OpRow] = field(default_factory=dict)
    functions: dict[Any, OpRow] = field(default_factory=dict)
    methods: dict[str, OpRow] = field(default_factory=dict)

    @classmethod
    def build(cls, rows=OP_TABLE) -> "OpIndex":
        idx = cls()
        for row in rows:
            for m in row.modules:
                idx.modules[m] = row
            for f in row.functions:
                idx.functions[f] = row
            for m in row.methods:
                idx.methods[m] = row
        return idx

    def lookup_module(self, mod: nn.Module) -> OpRow | None:
        for t in type(mod).__mro__:
            if t in self.modules:
                return self.modules[t]
        return None


OP_INDEX = OpIndex.build()


def _spelling(f: Callable) -> str:
    name = getattr(f, "__name__", str(f))
    for prefix, ns in (("F", F), ("torch", torch), ("operator", operator)):
        if getattr(ns, name, None) is f:
            return f"{prefix}.{name}"
    return f"{getattr(f, '__module__', '')}.{name}"


def markdown_table() -> str:
    """The table as Markdown, for the docs."""
    lines = ["| operator | treatment | spellings | note |", "| --- | --- | --- | --- |"]
    for r in OP_TABLE:
        sp = [f"nn.{m.__name__}" if m.__module__.startswith("torch.") else m.__name__ for m in r.modules]
        sp += [_spelling(f) for f in r.functions]
        sp += [f"Tensor.{m}" for m in r.methods]
        lines.append(f"| {r.name} | {r.treatment} | {', '.join(sp)} | {r.note} |")
    return "\n".join(lines)
