"""Pass between tracing and quantization: model libraries' building blocks rewritten as the torch ops the
quantizer knows, so they fold, fuse and quantize like a hand-written model.

    norm-act layers     timm's ``BatchNormAct2d`` (and ``SyncBatchNormAct``): one module that runs BatchNorm, then
                        dropout, then its activation. Traced as a leaf, then split into a plain ``nn.BatchNorm2d``
                        at the same path (same parameters and state_dict keys) followed by calls of its ``drop`` and
                        ``act`` children, so conv + BN (+ ReLU) fold as usual. Traced into instead, its BatchNorm
                        is an ``F.batch_norm`` call frozen in the train/eval mode of tracing, which never folds.
    same padding        timm's ``Conv2dSame`` (TensorFlow "SAME" padding computed from the input size, which torch.fx
                        cannot trace): a plain ``nn.Conv2d`` with no padding, after a :class:`SamePad2d` child that
                        pads by the input's size at run time (a leaf: exported with the sizes fixed).
    attention           ``F.scaled_dot_product_attention`` becomes matmul -> scale -> (mask) -> softmax -> matmul,
                        so both attention products run as integer matmuls like every other matmul.

The types are looked up by their qualified names, only when their library is already imported: timm is never
imported here.
"""
from __future__ import annotations

import logging
import math
import operator
import sys

import torch
import torch.nn.functional as F
from torch import fx, nn

logger = logging.getLogger(__name__)

# qualified class name -> the torch BatchNorm class its norm part is
_NORM_ACT = {
    "timm.layers.norm_act.BatchNormAct2d": nn.BatchNorm2d,
    "timm.layers.norm_act.SyncBatchNormAct": nn.BatchNorm2d,
}
_SAME_CONV = ("timm.layers.conv2d_same.Conv2dSame",)


def _loaded(qualified: str) -> type | None:
    module, _, name = qualified.rpartition(".")
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def _types(names) -> tuple[type, ...]:
    return tuple(t for t in (_loaded(n) for n in names) if isinstance(t, type))


def leaf_types() -> tuple[type, ...]:
    """Module types the tracer keeps whole so that :func:`canonicalize` can rewrite them."""
    return _types(_NORM_ACT) + _types(_SAME_CONV)


class SamePad2d(nn.Module):
    """TensorFlow "SAME" zero padding of an NCHW input for a following convolution (kernel, stride, dilation)."""

    def __init__(self, kernel_size, stride, dilation):
        super().__init__()
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)

    @staticmethod
    def _amount(size: int, k: int, s: int, d: int) -> int:
        return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)

    def forward(self, x):
        ph, pw = (self._amount(int(n), k, s, d) for n, k, s, d in
                  zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation))
        if ph == 0 and pw == 0:
            return x
        return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _plain_batch_norm(mod: nn.Module, cls: type) -> nn.Module:
    """A torch BatchNorm sharing ``mod``'s parameters and buffers (same names, so the same state_dict keys)."""
    bn = cls(mod.num_features, mod.eps, mod.momentum, mod.affine, mod.track_running_stats)
    for name in ("weight", "bias"):
        setattr(bn, name, getattr(mod, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(bn, name, getattr(mod, name))
    bn.train(mod.training)
    return bn


def _split_norm_act(gm: fx.GraphModule, node: fx.Node, mod: nn.Module, cls: type) -> None:
    bn = _plain_batch_norm(mod, cls)
    tail = node
    for child in ("drop", "act"):
        sub = getattr(mod, child, None)
        if sub is None or type(sub) is nn.Identity:
            continue
        bn.add_module(child, sub)  # a child of the BatchNorm: its path (and any parameters' keys) stay the same
        with gm.graph.inserting_after(tail):
            call = gm.graph.call_module(f"{node.target}.{child}", (tail,))
        tail.replace_all_uses_with(call, delete_user_cb=lambda u, c=call: u is not c)
        tail = call
    _set_module(gm, node.target, bn)


def _split_same_conv(gm: fx.GraphModule, node: fx.Node, mod: nn.Conv2d) -> None:
    conv = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, 0, mod.dilation, mod.groups,
                     mod.bias is not None, padding_mode=mod.padding_mode)
    conv.weight, conv.bias = mod.weight, mod.bias
    conv.train(mod.training)
    _set_module(gm, node.target, conv)
    # a sibling, not a child: fusion replaces the conv module with its QAT layer
    parent, _, name = node.target.rpartition(".")
    pad_name = f"{name}_same_pad"
    (gm.get_submodule(parent) if parent else gm).add_module(pad_name, SamePad2d(mod.kernel_size, mod.stride,
                                                                                mod.dilation))
    with gm.graph.inserting_before(node):
        pad = gm.graph.call_module(f"{parent}.{pad_name}" if parent else pad_name, (node.args[0],))
    node.replace_input_with(node.args[0], pad)


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


@fx.wrap
def _expect_default(value, default, name: str):
    """Raises when a forward argument the rewritten attention took at its default is given another value."""
    if value is not default and value != default:
        raise ValueError(f"the model was prepared with {name}={default!r} (its default) built into the attention; "
                         f"it was called with {name}={value!r}: prepare with concrete_args={{'{name}': ...}} instead")
    return value


def _static(gm: fx.GraphModule, node: fx.Node, value, name: str):
    """A model input left at its default (timm's ``attn_mask=None``, ``is_causal=False``) as that default; the graph
    checks at run time that the caller does not pass another value."""
    if isinstance(value, fx.Node) and value.op == "placeholder" and value.args \
            and (value.args[0] is None or isinstance(value.args[0], (bool, int, float))):
        with gm.graph.inserting_before(node):
            gm.graph.call_function(_expect_default, (value, value.args[0], value.target))
        return value.args[0]
    return value


def _split_attention(gm: fx.GraphModule, node: fx.Node) -> bool:
    q, k, v = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = _static(gm, node, _arg(node, 3, "attn_mask"), "attn_mask")
    dropout = _arg(node, 4, "dropout_p", 0.0)
    causal = _static(gm, node, _arg(node, 5, "is_causal", False), "is_causal")
    scale = node.kwargs.get("scale")
    if causal is not False or node.kwargs.get("enable_gqa", False) or not isinstance(dropout, (int, float)) \
            or (scale is not None and not isinstance(scale, (int, float))):
        logger.warning("'%s': scaled_dot_product_attention with is_causal / enable_gqa / a traced dropout or "
                       "scale stays one float operation; its matmuls are not quantized", node.name)
        return False
    g = gm.graph
    with g.inserting_before(node):
        kt = g.call_method("transpose", (k, -2, -1))
        scores = g.call_function(torch.matmul, (q, kt))
        if scale is None:
            dim = g.call_method("size", (q, -1))
            factor = g.call_function(operator.pow, (dim, -0.5))
        else:
            factor = float(scale)
        scores = g.call_function(torch.mul, (scores, factor))
        if mask is not None:
            scores = g.call_function(_add_attention_mask, (scores, mask))
        attn = g.call_function(torch.softmax, (scores, -1))
        if dropout:  # a module, so that it follows the model's train / eval mode
            gm.add_module(f"{node.name}_dropout", nn.Dropout(float(dropout)))
            attn = g.call_module(f"{node.name}_dropout", (attn,))
        out = g.call_function(torch.matmul, (attn, v))
    node.replace_all_uses_with(out)
    g.erase_node(node)
    return True


@fx.wrap
def _add_attention_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """scaled_dot_product_attention's mask: a boolean mask keeps True positions, a float mask is added."""
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite the library building blocks listed in the module docstring in ``gm`` (in place); returns ``gm``."""
    norm_act = {t: cls for t, cls in ((_loaded(n), c) for n, c in _NORM_ACT.items()) if isinstance(t, type)}
    same_conv = _types(_SAME_CONV)
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if type(mod) in norm_act:
                _split_norm_act(gm, node, mod, norm_act[type(mod)])
                changed += 1
            elif same_conv and type(mod) in same_conv:
                _split_same_conv(gm, node, mod)
                changed += 1
        elif node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            changed += _split_attention(gm, node)
    if changed:
        gm.graph.lint()
        gm.recompile()
        logger.debug("canonicalize: %d building blocks rewritten", changed)
    return gm
