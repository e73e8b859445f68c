"""The reconstruction units of a prepared GraphModule, each a runnable piece of its graph.

Design. ``prepare_by_platform`` returns a torch.fx GraphModule whose nodes run in execution order and whose QAT
layers keep their qualified names ("layer1.0.conv1", "features.3.conv.0.0", "bert.encoder.layer.5.output.dense").
A *unit* is what one reconstruction fits:

* pattern "layer": one quantized conv / linear layer (AdaRound);
* pattern "block": the consecutive layers sharing a name prefix (BRECQ): by default the prefix up to the first
  numeric component, i.e. a child of a Sequential / ModuleList (a ResNet BasicBlock "layer1.0", a MobileNet
  InvertedResidual "features.3", a transformer layer "encoder.layer.5"); a layer without one ("conv1", "fc") is its
  own block. ``block_depth`` fixes the prefix length instead.

The graph is cut into consecutive *segments*, one per unit: a segment starts at its unit's first layer (or, for a
block, at the first node that torch.fx recorded inside the block's module, e.g. a pre-norm) and runs up to the next
segment's start, so it holds the unit's layers and everything that follows them before the next unit: residual
adds, activations, pooling and the activation quantizers in between. A segment's *inputs* are the values it reads
from earlier nodes (the block input, a shortcut, an attention mask) and its *outputs* the values later nodes read.
Each segment is a small GraphModule over the same module objects as the model, so what reconstruction learns in it
is learned in the model. Its inputs and targets are captured with :class:`Capture`, a torch.fx Interpreter that
runs the whole model and stops as soon as it has the values asked for.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..fake_quantize import QuantizeBase
from ..nn.qat import QATMixin

__all__ = ["Segment", "split_segments", "unit_key", "Capture", "QDropMix"]


def unit_key(layer_name: str, pattern: str, block_depth: int | None = None) -> str:
    """The unit a quantized layer belongs to (see the module docstring)."""
    if pattern == "layer":
        return layer_name
    parts = layer_name.split(".")
    if block_depth:
        return ".".join(parts[:block_depth])
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return layer_name


@dataclass
class Segment:
    name: str                    # the unit: a block prefix or a layer name
    layers: list[str]            # quantized layers fitted in it
    inputs: list[str]            # graph node names it reads from earlier segments or the model's inputs
    outputs: list[str]           # graph node names later segments or the model's output read
    module: fx.GraphModule       # module(*inputs) -> tuple(outputs); shares its modules with the model
    drop: "QDropMix" = field(default=None)  # type: ignore[assignment]


class QDropMix(nn.Module):
    """QDrop inside a segment: ``where(rand < prob, quantized, float)`` after each activation quantizer while
    ``active`` (reconstruction steps only)."""

    def __init__(self, prob: float):
        super().__init__()
        self.prob, self.active = float(prob), False

    def forward(self, x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        if not self.active or self.prob >= 1.0 or not isinstance(xq, torch.Tensor) or not xq.is_floating_point():
            return xq
        return torch.where(torch.rand_like(xq) < self.prob, xq, x)


def _is_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    mod = gm.get_submodule(node.target)
    # embedding tables are looked up, not multiplied: their rounding is not fitted
    return isinstance(mod, QATMixin) and not isinstance(mod, nn.Embedding) and \
        isinstance(getattr(mod, "weight_fake_quant", None), QuantizeBase)


def _module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]


def _inside(node: fx.Node, prefix: str) -> bool:
    return any(p == prefix or p.startswith(prefix + ".") for p in _module_paths(node))


def _is_quantizer(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), QuantizeBase)


def split_segments(gm: fx.GraphModule, pattern: str, block_depth: int | None = None,
                   prob: float = 1.0) -> list[Segment]:
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    units: list[tuple[str, list[int]]] = []  # (unit name, positions of its layers)
    for i, n in enumerate(nodes):
        if not _is_layer(gm, n):
            continue
        key = unit_key(str(n.target), pattern, block_depth)
        if units and units[-1][0] == key:
            units[-1][1].append(i)
        else:
            units.append((key, [i]))
    if not units:
        raise ValueError("the model has no quantized conv / linear layers to reconstruct: call "
                         "prepare_by_platform(model, backend) first (and check exclude_module_name)")
    starts = [0]
    for k in range(1, len(units)):
        first, floor = units[k][1][0], units[k - 1][1][-1] + 1
        start = first
        if pattern == "block":  # pull in the block's own nodes before its first layer (a pre-norm)
            while start - 1 >= floor and (_inside(nodes[start - 1], units[k][0])
                                         or (_is_quantizer(gm, nodes[start - 1]) and start - 2 >= floor
                                             and _inside(nodes[start - 2], units[k][0]))):
                start -= 1
        starts.append(start)
    starts.append(len(nodes))
    seen: dict[str, int] = {}
    segments = []
    for k, (key, layer_pos) in enumerate(units):
        seen[key] = seen.get(key, 0) + 1
        name = key if seen[key] == 1 else f"{key}#{seen[key]}"
        body = nodes[starts[k]:starts[k + 1]]
        segments.append(_segment(gm, name, [str(nodes[i].target) for i in layer_pos], body, prob))
    return segments


def _segment(gm: fx.GraphModule, name: str, layers: list[str], body: list[fx.Node], prob: float) -> Segment:
    inside = set(body)
    inputs: list[fx.Node] = []
    for n in body:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr" and a not in inputs:
                inputs.append(a)
    outputs = [n for n in body if any(u not in inside for u in n.users)]
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {a: g.placeholder(a.name) for a in inputs}
    for n in body:
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a not in env:
                env[a] = g.node_copy(a)
        env[n] = g.node_copy(n, lambda x: env[x])
    g.output(tuple(env[o] for o in outputs))
    module = fx.GraphModule(gm, g, f"Segment_{name.replace('.', '_')}")
    drop = QDropMix(prob)
    if prob < 1.0:
        module.add_submodule("qdrop_mix", drop)
        for n in list(module.graph.nodes):
            if _is_quantizer(module, n) and not module.get_submodule(n.target).is_weight:
                with module.graph.inserting_after(n):
                    mixed = module.graph.call_module("qdrop_mix", (n.args[0], n))
                n.replace_all_uses_with(mixed, delete_user_cb=lambda u: u is not mixed)
        module.recompile()
    return Segment(name, layers, [a.name for a in inputs], [o.name for o in outputs], module, drop)


class _Done(Exception):
    pass


class Capture(fx.Interpreter):
    """Runs a GraphModule and returns the values of the named nodes, stopping once it has them all."""

    def __init__(self, gm: fx.GraphModule, names: list[str]):
        super().__init__(gm, garbage_collect_values=True)
        self.names = set(names)
        self.values: dict[str, object] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out
            if len(self.values) == len(self.names):
                raise _Done
        return out

    def capture(self, *args) -> dict[str, object]:
        self.values = {}
        try:
            self.run(*args)
        except _Done:
            pass
        missing = self.names - set(self.values)
        if missing:
            raise RuntimeError(f"reconstruction: the forward pass never computed {sorted(missing)}")
        return self.values


def batch_args(gm: fx.GraphModule, batch) -> tuple:
    """A calibration batch as the GraphModule's positional inputs: a tensor, a tuple / list whose first element is
    the input ((images, targets)), or a dict of forward parameter name -> value."""
    if isinstance(batch, dict):
        args = []
        for p in (n for n in gm.graph.nodes if n.op == "placeholder"):
            if p.target in batch:
                args.append(batch[p.target])
            elif p.args:
                args.append(p.args[0])  # the parameter's default
            else:
                raise ValueError(f"reconstruction: the batch has no value for the model input '{p.target}' "
                                 f"(batch keys: {sorted(batch)})")
        return tuple(args)
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (list, tuple)) and batch:
        return (batch[0],)
    raise TypeError(f"reconstruction: cannot feed a batch of type {type(batch).__name__}; give tensors, "
                    "(input, target) pairs or dicts of keyword arguments")
