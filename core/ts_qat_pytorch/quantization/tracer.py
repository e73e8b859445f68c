"""torch.fx tracing with leaf modules, concrete args, preserved attributes, and errors users can act on."""
from __future__ import annotations

import difflib
import logging
import os
import traceback
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn

from ..nn.channel_scale import ChannelScale
from .canonical import leaf_types as canonical_leaf_types

logger = logging.getLogger(__name__)

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

# Never traced into: their internals are not quantizable or not traceable. ChannelScale (the float tools' exact
# per-channel restore) stays one float node: traced into, its multiply would be quantized.
DEFAULT_LEAF_TYPES: tuple[type, ...] = (nn.RNNBase, ChannelScale)
try:
    from torchvision.ops import RoIPool as _RoIPool
    DEFAULT_LEAF_TYPES += (_RoIPool,)
except Exception:  # torchvision is optional
    pass


class TraceFailure(RuntimeError):
    """torch.fx could not trace the model; the message says where and what to do."""


def check_leaf_modules(model: nn.Module, leaf_module: Iterable[Any]) -> None:
    """``leaf_module`` entries must be module classes or qualified names of submodules of ``model``: a misspelt
    name would otherwise be ignored and the module traced (or fail to trace) after all."""
    names = [n for n, _ in model.named_modules() if n]
    for entry in leaf_module or ():
        if isinstance(entry, type) and issubclass(entry, nn.Module):
            continue
        if isinstance(entry, str):
            if entry in names:
                continue
            close = difflib.get_close_matches(entry, names, n=3)
            raise ValueError(f"leaf_module: no module named '{entry}' in {type(model).__name__}"
                             + (f"; did you mean {close}?" if close else
                                f"; its modules: {names[:8]}{' ...' if len(names) > 8 else ''}")
                             + " (entries are qualified module names or nn.Module classes)")
        raise ValueError(f"leaf_module entries are nn.Module classes or qualified module names (str), got "
                         f"{entry!r} ({type(entry).__name__})")


class QuantTracer(fx.Tracer):
    """A :class:`torch.fx.Tracer` that treats ``leaf_module`` entries (types or qualified names) as leaves
    and remembers which module it was inside when tracing failed."""

    def __init__(self, leaf_module: Iterable[Any] = ()):
        super().__init__()
        leaf = list(leaf_module or ())
        self.leaf_module = leaf
        # model libraries' blocks that quantization/canonical.py rewrites after tracing stay whole
        self.leaf_types = tuple(t for t in leaf if isinstance(t, type)) + DEFAULT_LEAF_TYPES + canonical_leaf_types()
        self.leaf_names = {t for t in leaf if isinstance(t, str)}
        self._qat_module_stack: list[tuple[str, str]] = []
        self.failed_in: list[tuple[str, str]] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self._qat_module_stack.append((name, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self._qat_module_stack)
            raise
        finally:
            self._qat_module_stack.pop()


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame outside torch and this package: the user's line that broke tracing."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if not f.filename.startswith(_TORCH_DIR) and not f.filename.startswith(_PKG_DIR)]
    return user[-1] if user else (frames[-1] if frames else None)


def _diagnose(exc: BaseException) -> tuple[str, list[str]]:
    msg = str(exc)
    if "control flow" in msg:
        return ("Python control flow (if / while / assert) depends on a tensor value, which torch.fx "
                "cannot know while tracing", [
                    "make the module a leaf: prepare_custom_config_dict={'leaf_module': [TheModule or "
                    "'its.qualified.name']} (it then stays float)",
                    "move the check into a function decorated with torch.fx.wrap",
                    "drop or rewrite the assert (torch._assert works under tracing)",
                    "pass fixed values for flag arguments: prepare_custom_config_dict={'concrete_args': {...}}",
                ])
    if "'len'" in msg or "len(" in msg:
        return ("len() of a traced tensor is not known while tracing (often in a tensor constructor such as "
                "torch.zeros(len(x), ...))", [
                    "use x.size(0) / x.shape[0], or build the tensor with a *_like constructor "
                    "(torch.zeros_like(x), x.new_zeros(...))",
                    "make the module a leaf ('leaf_module') or wrap the function with torch.fx.wrap",
                ])
    if "iterate" in msg or "iterable" in msg:
        return ("the code iterates over a tensor (or its shape) whose length torch.fx cannot know", [
            "iterate over a fixed Python range instead, or make the module a leaf ('leaf_module')",
        ])
    if "Proxy" in msg:
        return ("a traced tensor was used where a concrete Python value is needed (a tensor constructor "
                "such as torch.zeros(x.shape), item assignment, or a non-torch function)", [
                    "build tensors from existing ones: torch.zeros_like(x), x.new_zeros(...)",
                    "wrap the non-traceable function with torch.fx.wrap('fn_name') at module level",
                    "make the module a leaf ('leaf_module'), or split the model so the part is outside "
                    "the traced network (as for pre/post-processing)",
                ])
    return ("torch.fx raised an error while tracing", [
        "make the failing module a leaf ('leaf_module') or wrap the failing function with torch.fx.wrap",
        "split the model so the untraceable part runs outside the quantized network",
    ])


def trace_model(model: nn.Module, leaf_module=(), concrete_args: dict | None = None,
                preserve_attr: dict | list | None = None, tracer: fx.Tracer | None = None,
                fallback: Callable[[QuantTracer], fx.Tracer | None] | None = None) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule, or raise :class:`TraceFailure` naming the module, line and fix.

    When torch.fx fails on Python code and ``fallback(tracer)`` gives another tracer (prepare_by_platform: one that
    knows the input's shapes, quantization/shape_trace.py), the model is traced again with that one."""
    tracer = tracer or QuantTracer(leaf_module)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:
        traced = _trace_again(model, tracer, concrete_args, fallback, exc)
        if traced is not None:
            graph, second_tracer = traced
            return _finish(model, fx.GraphModule(second_tracer.root, graph, type(model).__name__), preserve_attr)
        cause, fixes = _diagnose(exc)
        where = ""
        failed = getattr(tracer, "failed_in", None)
        if failed:
            name, typ = failed[-1]
            where += f"\n  inside module '{name or '<root>'}' ({typ})"
        frame = _user_frame(exc)
        if frame is not None:
            where += f"\n  at {frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
        raise TraceFailure(
            f"torch.fx could not trace {type(model).__name__}: {cause}.{where}\n  error: "
            f"{type(exc).__name__}: {exc}\n  fixes:\n    - " + "\n    - ".join(fixes)) from exc
    return _finish(model, fx.GraphModule(tracer.root, graph, type(model).__name__), preserve_attr)


def _finish(model: nn.Module, gm: fx.GraphModule, preserve_attr) -> fx.GraphModule:
    _preserve_attributes(model, gm, preserve_attr)
    return gm


def _trace_again(model, tracer, concrete_args, fallback, exc) -> tuple[fx.Graph, fx.Tracer] | None:
    """(graph, tracer) from the fallback tracer, or None (a user's own tracer, no fallback, or it fails too)."""
    if type(tracer) is not QuantTracer or fallback is None or _diagnose(exc)[0].startswith("torch.fx raised"):
        return None
    second_tracer = fallback(tracer)
    if second_tracer is None:
        return None
    try:
        graph = second_tracer.trace(model, concrete_args=concrete_args)
    except Exception as second:  # noqa: BLE001 - the first failure is the one to report
        logger.debug("the fallback tracer failed too: %s", second)
        return None
    frame = _user_frame(exc)
    logger.warning("torch.fx could not trace %s (%s%s); traced it with %s instead", type(model).__name__,
                   str(exc).splitlines()[0][:120], f", at {os.path.basename(frame.filename)}:{frame.lineno}"
                   if frame else "", second_tracer)
    return graph, second_tracer


def _preserve_attributes(model: nn.Module, gm: fx.GraphModule, preserve_attr) -> None:
    if not preserve_attr:
        return
    spec = {"": list(preserve_attr)} if isinstance(preserve_attr, (list, tuple)) else dict(preserve_attr)
    for prefix, names in spec.items():
        src = model.get_submodule(prefix) if prefix else model
        try:
            dst = gm.get_submodule(prefix) if prefix else gm
        except AttributeError:
            dst = gm
        for attr in names:
            if not hasattr(src, attr):
                raise AttributeError(f"preserve_attr: '{prefix + '.' if prefix else ''}{attr}' does not exist on "
                                     f"{type(src).__name__}")
            value = getattr(src, attr)
            if callable(value) and hasattr(value, "__func__"):  # bound method: rebind to the GraphModule
                value = value.__func__.__get__(dst)
            setattr(dst, attr, value)
