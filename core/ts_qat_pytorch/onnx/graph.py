"""A read-only index over an ONNX graph for the export passes: producers, consumers, constant values."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphIndex:
    def __init__(self, model: onnx.ModelProto):
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer, a Constant, or a Cast of either (the exporter casts large int32
        zero-point buffers at run time); None for anything computed from inputs."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        n = self.producer.get(name)
        if n is None:
            return None
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name == "value_float":
                    return np.array(a.f, np.float32)
        if n.op_type == "Cast":
            v = self.const(n.input[0])
            to = attr(n, "to", None)
            if v is not None and to is not None:
                return v.astype(helper.tensor_dtype_to_np_dtype(to))
        return None


def attr(node: onnx.NodeProto, name: str, default):
    """An attribute's value (int, float or ints) or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove the initializers no node reads and no output names (left behind by a pass's rewrite)."""
    g = model.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)
