"""The layer patterns the float tools work on, found in a torch.fx trace of the float model.

The trace (the quantization tracer, with the caller's leaf modules) is a read-only map: its call_module nodes name
the model's own modules, which the tools then change in place. A pattern counts only where the values between its
layers have exactly one reader (no residual branch reads them) and each module is called once, so that changing
one layer's output channels can be compensated in the next layer and nowhere else.

* :func:`layer_batch_norms` - conv / linear -> BatchNorm pairs (folded by ``fold_bn``);
* :func:`layer_links` - conv -> [BatchNorm] -> [ReLU / ReLU6] -> conv (and linear -> linear) links, and
  :func:`chains` - links joined end to start (mobilenet_v2's expand -> depthwise -> project);
* :func:`norm_linear_groups` - a LayerNorm and the Linear layers reading its output (SmoothQuant).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..quantization.tracer import trace_model

__all__ = ["trace", "layer_batch_norms", "Link", "layer_links", "chains", "NormGroup", "norm_linear_groups",
           "in_channel_count"]

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# how each ReLU-like reader is called: module type, function or method -> "relu" / "relu6"
_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
_ACT_METHODS = {"relu": "relu"}


def trace(model: nn.Module, leaf_module: Iterable = ()) -> fx.GraphModule:
    """The float model's graph; its modules are the model's own objects."""
    return trace_model(model, leaf_module=tuple(leaf_module))


def _calls(gm: fx.GraphModule) -> collections.Counter:
    return collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _only_reader(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    if len(users) != 1 or not users[0].args or users[0].args[0] is not node:
        return None
    return users[0]


def _act_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module":
        return _ACT_MODULES.get(type(_module(gm, node)))
    if node.op == "call_function":
        return _ACT_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _ACT_METHODS.get(node.target)
    return None


def _is_layer(gm: fx.GraphModule, node: fx.Node, calls) -> bool:
    return node.op == "call_module" and type(_module(gm, node)) in LAYERS and calls[node.target] == 1


def layer_batch_norms(gm: fx.GraphModule) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """([(layer, batch norm)] that can be folded, [(batch norm, why not)] for every other BatchNorm)."""
    calls, pairs, skipped = _calls(gm), [], []
    for node in gm.graph.nodes:
        bn = _module(gm, node)
        if not isinstance(bn, BATCH_NORMS):
            continue
        src = node.args[0] if node.args else None
        why = None
        if calls[node.target] != 1:
            why = "called more than once"
        elif not isinstance(src, fx.Node) or not _is_layer(gm, src, calls):
            why = "not directly after a conv / linear layer called once"
        elif len(src.users) != 1:
            why = f"its layer '{src.target}' is also read elsewhere"
        elif bn.running_mean is None:
            why = "no running statistics (track_running_stats=False)"
        elif _module(gm, src).weight.shape[0] != bn.num_features:
            why = "its channels are not the layer's output channels"
        if why:
            skipped.append((str(node.target), why))
        else:
            pairs.append((str(src.target), str(node.target)))
    return pairs, skipped


@dataclass(frozen=True)
class Link:
    """layer1 -> [norm] -> [act] -> layer2: every value between them read once, layer1's output channels are
    layer2's input channels."""

    layer1: str
    layer2: str
    norm: str | None           # a BatchNorm between layer1 and the activation (folded before equalization)
    act: str | None            # "relu", "relu6" or None (no activation: the layers are linear in between)
    act_module: str | None     # the activation's module, if called only here (None: a function, a module called
                               # elsewhere too, or no activation); a ReLU6 is replaced through it


def in_channel_count(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _compatible(l1: nn.Module, l2: nn.Module) -> bool:
    """Same family (conv1d -> conv1d, conv2d -> conv2d, linear -> linear) and l1's outputs are l2's inputs."""
    return type(l1) is type(l2) and l1.weight.shape[0] == in_channel_count(l2)


def layer_links(gm: fx.GraphModule) -> tuple[list[Link], list[tuple[str, str]]]:
    """([Link], [(layer, why it is no link's first layer)]) for layers whose output reaches another layer."""
    calls, links, skipped = _calls(gm), [], []
    for node in gm.graph.nodes:
        if not _is_layer(gm, node, calls):
            continue
        cur, norm, act, act_module = node, None, None, None
        nxt = _only_reader(cur)
        if nxt is not None and isinstance(_module(gm, nxt), BATCH_NORMS) and calls[nxt.target] == 1:
            norm, cur = str(nxt.target), nxt
            nxt = _only_reader(cur)
        if nxt is not None and _act_kind(gm, nxt) is not None:  # a shared ReLU module (ResNet's) is fine
            act = _act_kind(gm, nxt)
            act_module = str(nxt.target) if nxt.op == "call_module" and calls[nxt.target] == 1 else None
            cur = nxt
            nxt = _only_reader(cur)
        if nxt is None or not _is_layer(gm, nxt, calls):
            continue
        l1, l2 = _module(gm, node), _module(gm, nxt)
        if not _compatible(l1, l2):
            skipped.append((str(node.target), f"'{nxt.target}' is not the same kind of layer or its input "
                                              "channels differ"))
            continue
        links.append(Link(str(node.target), str(nxt.target), norm, act, act_module))
    return links, skipped


def chains(links: list[Link]) -> list[list[Link]]:
    """Links joined where one's layer2 is the next one's layer1, in graph order."""
    by_first = {lk.layer1: lk for lk in links}
    seconds = {lk.layer2 for lk in links}
    out = []
    for lk in links:
        if lk.layer1 in seconds:
            continue  # not a chain's start
        chain = [lk]
        while chain[-1].layer2 in by_first:
            chain.append(by_first[chain[-1].layer2])
        out.append(chain)
    return out


def _reads_metadata(node: fx.Node) -> bool:
    """``x.shape``, ``x.size()``, ``x.dim()``: a reader that does not see the values (scaling them changes nothing)."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in ("shape", "dtype", "device", "ndim")
    return node.op == "call_method" and node.target in ("size", "dim")


@dataclass(frozen=True)
class NormGroup:
    """A LayerNorm and the Linear layers reading its output directly; ``others``: the graph nodes that read its
    values too (a post-LayerNorm encoder's residual sum; ``x.shape`` and the like are not counted)."""

    norm: str
    linears: tuple[str, ...]
    others: tuple[str, ...]


def norm_linear_groups(gm: fx.GraphModule) -> tuple[list[NormGroup], list[tuple[str, str]]]:
    """([NormGroup] of LayerNorms read by at least one Linear, [(LayerNorm, why it cannot be smoothed)])."""
    calls, groups, skipped = _calls(gm), [], []
    for node in gm.graph.nodes:
        ln = _module(gm, node)
        if not isinstance(ln, nn.LayerNorm):
            continue
        linears, others = [], []
        for u in node.users:
            mod = _module(gm, u)
            if isinstance(mod, nn.Linear) and calls[u.target] == 1 and len(u.args) == 1 and u.args[0] is node \
                    and not u.kwargs:
                linears.append(str(u.target))
            elif not _reads_metadata(u):
                others.append(u.name)
        if not linears:
            continue
        why = None
        if calls[node.target] != 1:
            why = "called more than once"
        elif not ln.elementwise_affine:
            why = "no weight to fold the smoothing into (elementwise_affine=False)"
        elif len(ln.normalized_shape) != 1:
            why = "normalizes more than the last dimension"
        if why:
            skipped.append((str(node.target), why))
        else:
            groups.append(NormGroup(str(node.target), tuple(linears), tuple(others)))
    return groups, skipped
