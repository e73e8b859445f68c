"""Pass 3x of export: 16-bit activations (W8A16 layers, ``a_qscheme`` bit 16).

torch's exporters write QuantizeLinear/DequantizeLinear only with 8-bit zero points, so a frozen 16-bit quantizer
(qdq.QDQ with a 16-bit container) exports as an 8-bit-typed placeholder pair. This pass finds each such pair by
its stub's name (as naming.py does) and gives it its real scale and a uint16 / int16 zero point, which ONNX allows
from opset 21 and onnxruntime runs (the layers next to it run in float between DequantizeLinear and
QuantizeLinear; the 8-bit layers elsewhere still fuse into integer kernels).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from torch import fx

from ..fake_quantize import QuantizeBase
from .naming import _stub_of
from .qdq import QDQ

__all__ = ["WIDE_OPSET", "check_export_opset", "widen_quantizers"]

WIDE_OPSET = 21  # the first opset whose QuantizeLinear/DequantizeLinear take 16-bit integers
_NP = {"uint16": np.uint16, "int16": np.int16}
_ONNX = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8, "uint16": TensorProto.UINT16,
         "int16": TensorProto.INT16}


def _wide_quantizers(gm: fx.GraphModule) -> tuple[list[str], list[str]]:
    """(activation quantizers, weight quantizers) whose range needs more than 8 bits."""
    acts, weights = [], []
    for name, m in gm.named_modules():
        if isinstance(m, QuantizeBase) and m.quant_max - m.quant_min > 255:
            (weights if m.is_weight else acts).append(m.qualname or name)
    return acts, weights


def check_export_opset(gm: fx.GraphModule, opset_version: int) -> None:
    """Refuse, before any export work, what the file cannot hold: 16-bit quantizers below opset 21, 16-bit weights."""
    acts, weights = _wide_quantizers(gm)
    if weights:
        raise ValueError(f"{len(weights)} weight quantizer(s) use more than 8 bits ({', '.join(weights[:4])}): only "
                         "activations can be 16-bit in the export. Keep w_qscheme at 8 bits (a_qscheme bit 16 gives "
                         "W8A16 layers)")
    if acts and opset_version < WIDE_OPSET:
        shown = ", ".join(acts[:4]) + (" ..." if len(acts) > 4 else "")
        raise ValueError(f"{len(acts)} activation quantizer(s) are 16-bit ({shown}), and ONNX QuantizeLinear/"
                         f"DequantizeLinear take 16-bit integers only from opset 21: pass opset_version=21 to "
                         f"convert_export (got {opset_version})")


def _fresh_name(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def widen_quantizers(model: onnx.ModelProto, frozen: fx.GraphModule, stub_names: dict[str, str]) -> int:
    """Give each 16-bit stub's QuantizeLinear and its DequantizeLinear nodes the stub's scale and a 16-bit zero
    point (new initializers: the exporter may share the placeholder's constants among stubs). Returns how many
    quantizers were widened; raises if a 16-bit stub has no QuantizeLinear in the file."""
    wide = {s: frozen.get_submodule(s) for s in stub_names}
    wide = {s: q for s, q in wide.items() if isinstance(q, QDQ) and q.wide}
    if not wide:
        return 0
    g = model.graph
    taken = {i.name for i in g.initializer} | {v for n in g.node for v in [*n.input, *n.output]}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    retyped: dict[str, int] = {}
    done = set()
    for node in g.node:
        stub = _stub_of(node) if node.op_type == "QuantizeLinear" else None
        if stub not in wide:
            continue
        q = wide[stub]
        dqs = [u for u in consumers.get(node.output[0], []) if u.op_type == "DequantizeLinear"]
        scale = np.asarray(q.scale.numpy() if q.ch_axis >= 0 else q.scale, np.float32)
        zp = np.asarray(q.zero_point.numpy() if q.ch_axis >= 0 else q.zero_point).astype(_NP[q.onnx_dtype])
        base = stub_names[stub]
        scale_name = _fresh_name(f"{base}_scale", taken)
        zp_name = _fresh_name(f"{base}_zero_point", taken)
        g.initializer.extend([numpy_helper.from_array(scale, scale_name), numpy_helper.from_array(zp, zp_name)])
        for n in [node, *dqs]:
            del n.input[1:]
            n.input.extend([scale_name, zp_name])
        retyped[node.output[0]] = _ONNX[q.onnx_dtype]
        done.add(stub)
    for v in list(g.value_info) + list(g.output):  # the exporter annotated the placeholder's 8-bit type
        if v.name in retyped and v.type.HasField("tensor_type"):
            v.type.tensor_type.elem_type = retyped[v.name]
    missing = sorted(stub_names[s] for s in set(wide) - done)
    if missing:
        raise RuntimeError(f"the exported ONNX lost the 16-bit QuantizeLinear of {missing[:5]}: please report this "
                           "with the model; try exporter='legacy' meanwhile")
    return len(done)
