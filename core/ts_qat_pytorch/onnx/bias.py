"""Pass 3b of export: write each quantized Conv / Linear bias as int32 + DequantizeLinear (with its zero point).

The frozen model already holds every such bias on the int32 grid ``input scale x weight scale``
(``nn/qat/modules.py: deployed_bias``); torch's exporter writes it as a float constant. Stating it as
int32 + DequantizeLinear in the file:

* tells a deployment tool the integer bias exactly, instead of leaving it to re-derive one;
* lets onnxruntime fuse a Linear whose output stays float (``float_outputs``: its consumers are float
  ops) into a QGemm that writes float. With a float bias and no QuantizeLinear after the layer, its
  WeightBiasQuantization pass does not run and the layer falls back to a float Gemm over dequantized
  weights: measured 12.5 ms against 5.7 ms for a (1024, 384) x (384, 1536) layer on 2 threads.

Layers whose output is quantized fuse either way (onnxruntime then stores the same int32 itself), so the
pass changes no numbers. It handles ``Conv(DQ(x), DQ(w), bias)``, ``Gemm(DQ(x), DQ(w), bias)`` and
``Add(MatMul(DQ(x), [Transpose] DQ(w)), bias)``, per-tensor input scale, per-tensor or per-output-channel weight
scale.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import GraphIndex, attr, drop_unused_initializers


class _Graph(GraphIndex):
    def is_weight(self, name: str) -> bool:
        """A constant, or the QuantizeLinear of a constant (how the exporter writes a fake-quantized weight)."""
        n = self.producer.get(name)
        return name in self.inits or (n is not None and n.op_type == "QuantizeLinear" and n.input[0] in self.inits)

    def dq_scale(self, name: str, through_transpose: bool, weight: bool = False) -> tuple[np.ndarray, int] | None:
        """(scale, axis) of the DequantizeLinear that produces ``name`` (optionally through a Transpose); with
        ``weight``, only where it dequantizes a constant."""
        n = self.producer.get(name)
        perm = None
        if through_transpose and n is not None and n.op_type == "Transpose":
            perm = attr(n, "perm", None)
            n = self.producer.get(n.input[0])
        if n is None or n.op_type != "DequantizeLinear":
            return None
        if weight and not self.is_weight(n.input[0]):
            return None
        scale = self.const(n.input[1])
        if scale is None:
            return None
        axis = attr(n, "axis", 1)
        if perm is not None and scale.size > 1:
            axis = perm.index(axis)
        return scale.astype(np.float32), axis


def quantize_biases(model: onnx.ModelProto) -> int:
    """Rewrite float Conv / Linear biases as int32 + DequantizeLinear in place; returns how many were rewritten."""
    G = _Graph(model)
    new_nodes: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (consumer, DQ to insert before it)
    names = set(G.inits) | {o for n in G.g.node for o in n.output} | {i.name for i in G.g.input}
    done = 0
    for node in list(G.g.node):
        if node.op_type == "Conv":
            if len(node.input) < 3 or not node.input[2]:
                continue
            x, w, bias_name, host, slot = node.input[0], node.input[1], node.input[2], node, 2
            w_out_axis = 0
            sw = G.dq_scale(w, through_transpose=False, weight=True)
        elif node.op_type == "Gemm":
            if len(node.input) < 3 or attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 \
                    or attr(node, "beta", 1.0) != 1.0:
                continue
            x, w, bias_name, host, slot = node.input[0], node.input[1], node.input[2], node, 2
            w_out_axis = 0 if attr(node, "transB", 0) else 1
            sw = G.dq_scale(w, through_transpose=False, weight=True)
        elif node.op_type == "MatMul":
            users = G.consumers.get(node.output[0], [])
            if len(users) != 1 or users[0].op_type != "Add":
                continue
            host = users[0]
            slot = 1 if host.input[0] == node.output[0] else 0
            x, w, bias_name = node.input[0], node.input[1], host.input[slot]
            w_out_axis = -1
            sw = G.dq_scale(w, through_transpose=True, weight=True)
        else:
            continue
        sx = G.dq_scale(x, through_transpose=False)
        bias = G.const(bias_name)
        if sx is None or sw is None or bias is None or bias.ndim != 1 or bias.dtype != np.float32 \
                or sx[0].size != 1:
            continue
        s_w, w_axis = sw
        if s_w.size > 1:
            if s_w.size != bias.size or (w_out_axis >= 0 and w_axis != w_out_axis) \
                    or (w_out_axis < 0 and w_axis not in (-1, 1)):
                continue
        scale = (np.float32(sx[0].reshape(())) * s_w.reshape(-1)).astype(np.float32)
        if np.any(scale <= 0):
            continue
        q = np.clip(np.round(bias / scale), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
        if np.any(np.abs(q * scale.astype(np.float64) - bias) > np.maximum(1e-3 * scale, 4 * np.spacing(np.abs(bias)))):
            continue  # not a bias deployed_bias put on the grid (e.g. a constant added after an activation matmul)
        # torch's exporter shares one initializer among equal constants (zero biases of untrained layers), so
        # each rewritten layer gets its own int32 tensor (its grid differs)
        base, k = f"{bias_name}_int32", 1
        while base in names:
            base, k = f"{bias_name}_int32_{k}", k + 1
        names.update((base, f"{base}_scale", f"{base}_zero_point", f"{base}_dequantized"))
        scale = scale if scale.size > 1 else scale.reshape(())
        G.g.initializer.extend([numpy_helper.from_array(q, base), numpy_helper.from_array(scale, f"{base}_scale"),
                                numpy_helper.from_array(np.zeros(scale.shape, np.int32), f"{base}_zero_point")])
        dq = helper.make_node("DequantizeLinear", [base, f"{base}_scale", f"{base}_zero_point"],
                              [f"{base}_dequantized"], name=f"{base}_DequantizeLinear", axis=0)
        host.input[slot] = dq.output[0]
        new_nodes.append((host, dq))
        done += 1
    for host, dq in new_nodes:  # keep the node list topologically sorted: the DQ right before its consumer
        idx = list(G.g.node).index(host)
        G.g.node.insert(idx, dq)
    drop_unused_initializers(model)
    return done
