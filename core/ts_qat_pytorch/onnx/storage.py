"""Pass 3a of export: store the file the way deployment toolchains read a QDQ model.

torch's exporter writes a fake-quantized weight as ``DequantizeLinear(QuantizeLinear(float weight))`` and the
quantization parameters as ``Constant`` nodes or ``Identity`` copies of initializers. onnxruntime's
quantize_static, TensorRT and the NPU converters use another convention, which this pass writes:

* each weight is an integer initializer (int8 / uint8, named as the parameter JSON names it) read by one
  ``DequantizeLinear``: a quarter of the float file's size, and the integers a converter imports are the ones
  training used, not a re-rounding of float values;
* scales and zero points are initializers, never ``Constant`` / ``Identity`` nodes;
* every QuantizeLinear / DequantizeLinear names its zero point. The input is optional in ONNX, but Rockchip's
  rknn-toolkit2 2.5.0 indexes it: a DequantizeLinear without one stops its ``build`` with ``IndexError: list
  index out of range`` in ``graph_optimizer.fold_constant`` (measured on the int32 bias of a Gemm).

The numbers do not change: the integers are what the QuantizeLinear computed at run time (round half to even,
saturate), so onnxruntime gives bit-identical outputs.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .graph import GraphIndex, attr, drop_unused_initializers

_RANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255), np.dtype(np.int16): (-32768, 32767),
          np.dtype(np.uint16): (0, 65535), np.dtype(np.int32): (-(2 ** 31), 2 ** 31 - 1)}


def constants_as_initializers(model: onnx.ModelProto) -> int:
    """``Constant`` nodes and ``Identity`` copies of constants become initializers; returns how many nodes went."""
    g = model.graph
    taken = {i.name for i in g.initializer}
    alias: dict[str, str] = {}
    keep = []
    for n in g.node:
        value = next((a for a in n.attribute if a.name == "value"), None) if n.op_type == "Constant" else None
        if value is not None and len(n.attribute) == 1:
            t = onnx.TensorProto()
            t.CopyFrom(value.t)
            t.name = n.output[0]
            g.initializer.append(t)
            taken.add(t.name)
            continue
        if n.op_type == "Identity" and alias.get(n.input[0], n.input[0]) in taken \
                and n.output[0] not in {o.name for o in g.output}:
            alias[n.output[0]] = alias.get(n.input[0], n.input[0])
            continue
        keep.append(n)
    removed = len(g.node) - len(keep)
    for n in keep:
        for k, v in enumerate(n.input):
            if v in alias:
                n.input[k] = alias[v]
    del g.node[:]
    g.node.extend(keep)
    return removed


def _quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear on a constant: saturate(round_half_even(x / scale) + zero_point)."""
    if scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    lo, hi = _RANGE[zp.dtype]
    q = np.rint(x.astype(np.float32) / scale.astype(np.float32)) + zp.astype(np.int64)
    return np.clip(q, lo, hi).astype(zp.dtype)


def store_weights_as_integers(model: onnx.ModelProto) -> dict[str, str]:
    """Replace ``QuantizeLinear(float constant)`` feeding DequantizeLinear nodes by the integer constant.
    Returns {float weight name: integer initializer name}."""
    G = GraphIndex(model)
    g = G.g
    outputs = {o.name for o in g.output}
    done: dict[str, str] = {}
    drop: list[onnx.NodeProto] = []
    for q in g.node:
        if q.op_type != "QuantizeLinear" or len(q.input) < 3 or q.input[0] not in G.inits:
            continue
        users = G.consumers.get(q.output[0], [])
        x, scale, zp = G.const(q.input[0]), G.const(q.input[1]), G.const(q.input[2])
        if not users or any(u.op_type != "DequantizeLinear" for u in users) or scale is None or zp is None \
                or x.dtype != np.float32 or zp.dtype not in _RANGE:
            continue
        axis = attr(q, "axis", 1) % max(x.ndim, 1)
        ints = _quantize(x, scale, zp, axis)
        name = q.input[0]
        shared = name in outputs or len(G.consumers.get(name, [])) > 1  # the float tensor stays for its other readers
        new = f"{name}_quantized" if shared else name
        k = 1
        while shared and new in G.inits:
            new, k = f"{name}_quantized_{k}", k + 1
        if not shared:
            g.initializer.remove(G.inits[name])
        g.initializer.append(numpy_helper.from_array(ints, new))
        G.inits[new] = g.initializer[-1]
        for u in users:
            u.input[0] = new
        drop.append(q)
        done[name] = new
    for q in drop:
        g.node.remove(q)
    retyped = set(done) | set(done.values())  # the exporter's type annotations of the float weights are stale
    for coll in (g.value_info, g.input):
        stale = [v for v in coll if v.name in retyped and v.name in G.inits]
        for v in stale:
            coll.remove(v)
    drop_unused_initializers(model)
    return done


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """``Transpose(DequantizeLinear(integer weight))`` -> ``DequantizeLinear(transposed integer weight)``.

    torch's current exporter writes a Linear applied to a 3-D tensor as ``MatMul(x, Transpose(DQ(W)))``. NPU converters
    look for the quantized weight right at the MatMul: rknn-toolkit2 2.5.0 took the transposed tensor for a float16
    weight and stopped (``Invalid w_par['dtype'] = float16``). The weight is stored as the MatMul reads it (onnxruntime's
    quantize_static layout), the per-channel axis moved with it. Returns how many Transposes went."""
    G = GraphIndex(model)
    g = G.g
    drop = []
    for t in g.node:
        if t.op_type != "Transpose":
            continue
        dq = G.producer.get(t.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in G.inits \
                or len(G.consumers.get(dq.output[0], [])) != 1 or len(G.consumers.get(dq.input[0], [])) != 1:
            continue
        w = G.const(dq.input[0])
        perm = attr(t, "perm", None) or list(range(w.ndim))[::-1]
        init = G.inits[dq.input[0]]
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.transpose(perm)), init.name))
        scale = G.const(dq.input[1])
        if scale is not None and scale.size > 1:
            axis = attr(dq, "axis", 1) % w.ndim
            for a in dq.attribute:
                if a.name == "axis":
                    a.i = list(perm).index(axis)
        for u in G.consumers.get(t.output[0], []):
            for k, v in enumerate(u.input):
                if v == t.output[0]:
                    u.input[k] = dq.output[0]
        for o in g.output:
            if o.name == t.output[0]:
                o.name = dq.output[0]
        drop.append(t)
    for t in drop:
        g.node.remove(t)
    stale = {t.output[0] for t in drop} | {G.producer[t.input[0]].output[0] for t in drop}
    for v in [v for v in g.value_info if v.name in stale]:
        g.value_info.remove(v)
    return len(drop)


def explicit_zero_points(model: onnx.ModelProto) -> int:
    """Give every QuantizeLinear / DequantizeLinear without a zero point an explicit 0 of the right type;
    returns how many were given one."""
    G = GraphIndex(model)
    g = G.g
    added = 0
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or (len(n.input) > 2 and n.input[2]):
            continue
        scale = G.const(n.input[1])
        shape = scale.shape if scale is not None else ()
        if n.op_type == "DequantizeLinear":
            x = G.const(n.input[0])
            dtype = x.dtype if x is not None else _producer_zero_point_dtype(G, n.input[0])
        else:
            dtype = np.dtype(np.uint8)  # ONNX's default for a QuantizeLinear without zero point
        name = f"{n.name or n.output[0]}_zero_point"
        g.initializer.append(numpy_helper.from_array(np.zeros(shape, dtype), name))
        del n.input[2:]
        n.input.append(name)
        added += 1
    return added


def _producer_zero_point_dtype(G: GraphIndex, name: str) -> np.dtype:
    q = G.producer.get(name)
    if q is not None and q.op_type == "QuantizeLinear" and len(q.input) > 2:
        zp = G.const(q.input[2])
        if zp is not None:
            return zp.dtype
    return np.dtype(np.uint8)


def quantized_tensors(model: onnx.ModelProto) -> dict[str, str]:
    """{name: "activation" | "weight"} of every tensor the file quantizes: the float inputs of QuantizeLinear, and the
    8-bit integer weights (read by a DequantizeLinear, or by the Gather of an embedding table); int32 biases are not
    listed: the JSON derives them."""
    g = model.graph
    eight_bit = {i.name for i in g.initializer if i.data_type in (TensorProto.INT8, TensorProto.UINT8)}
    zero_points = {n.input[2] for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2}
    out = {}
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            out[n.input[0]] = "activation"
        elif n.op_type in ("DequantizeLinear", "Gather") and n.input[0] in eight_bit - zero_points:
            out[n.input[0]] = "weight"
    return out


def weight_layouts(model: onnx.ModelProto) -> dict[str, dict]:
    """{integer weight: {"onnx_shape", "onnx_axis"}}: how the file stores each weight (a MatMul's is transposed
    from PyTorch's [out, in]; its per-channel axis moves with it)."""
    G = GraphIndex(model)
    out = {}
    for name, kind in quantized_tensors(model).items():
        if kind != "weight":
            continue
        dq = next((n for n in G.consumers.get(name, []) if n.op_type == "DequantizeLinear"), None)
        scale = G.const(dq.input[1]) if dq is not None else None
        axis = attr(dq, "axis", 1) if scale is not None and scale.size > 1 else None
        out[name] = {"onnx_shape": list(G.inits[name].dims), "onnx_axis": axis}
    return out
