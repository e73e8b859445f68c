"""Tracing that knows the input's shape: the fallback when torch.fx alone cannot trace a model.

torch.fx traces with placeholders whose shapes are unknown, so Python code that looks at a shape (timm's
``if x.shape[-2] < 7``, MobileViT's ``if new_h != H``, EfficientViT's ``v.device.type``) cannot be traced. The
:class:`ShapeTracer` runs the model on example inputs while it records the graph: every traced value carries the
real tensors it stands for, and asking a traced tensor for its shape, size, dimension count, device or dtype gives
Python values, on which such code runs as in eager mode. The graph is then specialised to the example's channel
and spatial sizes; the batch size stays free. The tracer runs the model twice, with two batch sizes, and a
dimension whose size differs between the runs (the batch, and whatever follows it through reshapes) stays a traced
``size()`` call.

Only shapes are specialised: a branch on tensor values (``if x.sum() > 0``) still fails as with torch.fx. The
model's state (BatchNorm running statistics moved by the example runs) is restored afterwards.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate

from .tracer import QuantTracer

logger = logging.getLogger(__name__)

BATCHES = (2, 3)  # two batch sizes: a dimension that differs between them follows the batch


def _values(a: Any, i: int) -> Any:
    return map_aggregate(a, lambda x: x.values[i] if isinstance(x, ShapeProxy) else x)


class ShapeProxy(fx.Proxy):
    """A traced value with the real values it takes in the example runs (one per batch size)."""

    values: tuple = ()

    def _dims(self) -> list:
        shapes = [tuple(v.shape) for v in self.values]
        if len({len(s) for s in shapes}) != 1:
            raise fx.proxy.TraceError(f"'{self.node.name}' changes its number of dimensions with the batch size")
        return [shapes[0][d] if len({s[d] for s in shapes}) == 1 else self.tracer.create_proxy(
            "call_method", "size", (self, d), {}) for d in range(len(shapes[0]))]

    @property
    def shape(self):
        return tuple(self._dims())

    def size(self, dim: int | None = None):
        if dim is None:
            return tuple(self._dims())
        return self._dims()[dim]

    def dim(self) -> int:
        return self.values[0].dim()

    @property
    def ndim(self) -> int:
        return self.values[0].dim()

    def numel(self):
        sizes = {v.numel() for v in self.values}
        return sizes.pop() if len(sizes) == 1 else self.tracer.create_proxy("call_method", "numel", (self,), {})

    @property
    def device(self):
        return self.values[0].device

    @property
    def dtype(self):
        return self.values[0].dtype

    @property
    def is_cuda(self) -> bool:
        return self.values[0].is_cuda


class ShapeTracer(QuantTracer):
    """A :class:`QuantTracer` whose traced tensors know their shapes (see the module docstring)."""

    def __init__(self, example_inputs: Sequence[Any], leaf_module=()):
        super().__init__(leaf_module)
        self.examples = [list(_with_batch(example_inputs, b)) for b in BATCHES]
        self._next_input = 0
        self._eager = 0

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ShapeProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if not isinstance(proxy, ShapeProxy):
            return proxy
        if kind == "placeholder":
            i = self._next_input
            self._next_input += 1
            if i >= len(self.examples[0]):
                raise TypeError(f"the model's forward takes more tensor arguments than the {len(self.examples[0])} "
                                "example inputs given (prepare_custom_config_dict['example_inputs'])")
            proxy.values = tuple(ex[i] for ex in self.examples)
            return proxy
        proxy.values = tuple(self._run(kind, target, _values(args, i), _values(kwargs, i)) for i in range(len(BATCHES)))
        return proxy

    def _run(self, kind, target, args, kwargs):
        self._eager += 1  # the op and whatever it calls run as plain PyTorch (see call_module and getattr)
        try:
            return self._run_eagerly(kind, target, args, kwargs)
        finally:
            self._eager -= 1

    def _run_eagerly(self, kind, target, args, kwargs):
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":
            return self.root.get_submodule(target)(*args, **kwargs)
        if kind == "get_attr":
            obj = self.root
            for part in str(target).split("."):
                obj = getattr(obj, part)
            return obj
        raise NotImplementedError(kind)

    def __repr__(self) -> str:
        shapes = [tuple(x.shape) for x in self.examples[0] if isinstance(x, torch.Tensor)]
        return (f"the example input's shapes {shapes} known: the prepared model is specialised to those sizes but "
                "for the batch dimension")

    def call_module(self, m, forward, args, kwargs):
        if self._eager:  # torch.fx patches every module call while tracing; the example runs bypass it
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def trace(self, root, concrete_args=None):
        if isinstance(root, nn.Module):
            saved = {k: v.detach().clone() for k, v in root.state_dict(keep_vars=True).items()}
            try:
                with torch.no_grad():
                    return super().trace(root, concrete_args)
            finally:
                root.load_state_dict(saved)
        return super().trace(root, concrete_args)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._eager:  # a parameter read inside an example run: the tensor itself
            return attr_val
        out = super().getattr(attr, attr_val, parameter_proxy_cache)
        if isinstance(out, ShapeProxy) and not out.values:
            out.values = (attr_val,) * len(BATCHES)
        return out


def _with_batch(example_inputs, batch: int):
    """Each example tensor with ``batch`` rows (rows repeated or cut from the example's own)."""
    def resize(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        reps = -(-batch // t.shape[0])
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch]
    return [map_aggregate(x, resize) for x in example_inputs]


def shape_tracer_for(model: nn.Module, given: Any, tracer: QuantTracer) -> ShapeTracer | None:
    """A :class:`ShapeTracer` with ``tracer``'s leaf modules and :func:`example_inputs_for` ``model``; None when no
    example input is known."""
    examples = example_inputs_for(model, given)
    return ShapeTracer(examples, tracer.leaf_module) if examples is not None else None


def example_inputs_for(model: nn.Module, given: Any) -> tuple | None:
    """The example inputs to trace ``model`` with: ``given`` (a tensor or a tuple of them) or, for a timm model,
    a random image of its configured input size; None when neither is known."""
    if given is not None:
        return tuple(given) if isinstance(given, (tuple, list)) else (given,)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size and len(size) == 3:
        logger.info("tracing %s with a %s input, its pretrained_cfg input_size", type(model).__name__, tuple(size))
        return (torch.randn(1, *size),)
    return None
