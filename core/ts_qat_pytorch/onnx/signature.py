"""What goes into and out of the exported file: the dummy input bound to the traced forward's parameters,
and nested inputs and outputs flattened into named ONNX tensors.

Only tensors become ONNX inputs and outputs. Containers are flattened depth first, dict keys in insertion
order (torch.export's order), and each tensor is named after its path, parts joined by ``_``:

    inputs   the forward parameter's name (``x``; a dict ``dummy_input`` names them itself); inside a
             container argument its keys follow: ``batch_image`` for ``batch["image"]``, ``pair_1`` for ``pair[1]``.
    outputs  one tensor: ``output``; a tuple or list: ``output_0``, ``output_1``; nested: ``output_0_1``;
             a dict (torchvision segmentation: ``{"out": ..., "aux": ...}``): its keys, ``out``, ``aux``;
             inside a dict: ``aux_0``; a named tuple: its field names.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

KeyPath = tuple  # a pytree key path: MappingKey / SequenceKey / GetAttrKey entries


def leaves(tree: Any, kind: type = torch.Tensor) -> list[tuple[KeyPath, Any]]:
    """(key path, leaf) of every leaf of type ``kind`` in a nested structure, in export order."""
    flat, _ = pytree.tree_flatten_with_path(tree)
    return [(path, leaf) for path, leaf in flat if isinstance(leaf, kind)]


def _key(entry) -> str:
    for attr in ("key", "idx", "name"):  # MappingKey, SequenceKey, GetAttrKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def output_names(paths: list[KeyPath]) -> list[str]:
    """The ONNX name of each output tensor (module docstring)."""
    if len(paths) == 1 and all(isinstance(k, pytree.SequenceKey) for k in paths[0]):
        return ["output"]
    names = []
    for path in paths:
        parts = [_key(k) for k in path]
        if not path or isinstance(path[0], pytree.SequenceKey):
            parts.insert(0, "output")
        names.append("_".join(parts))
    return names


def input_names(parameters: list[str], paths: list[KeyPath]) -> list[str]:
    """The ONNX name of each input tensor: its forward parameter, then its path inside a container argument."""
    return ["_".join([parameters[path[0].idx]] + [_key(k) for k in path[1:]]) for path in paths]


def forward_parameters(gm: fx.GraphModule) -> list[fx.Node]:
    """The traced forward's parameters (placeholders; ``target`` is the parameter's name)."""
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def check_batch_size(batch_size) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int (the batch dimension baked into the file) or None "
                         f"for the dummy input's own, got {batch_size!r}; use dynamic_batch=True for a symbolic one")


def _bind_keywords(gm: fx.GraphModule, given: dict) -> tuple:
    """A dict dummy input as the positional arguments it means (one order for both exporters and for naming)."""
    params = forward_parameters(gm)
    names = [p.target for p in params]
    unknown = [k for k in given if k not in names]
    if unknown:
        raise ValueError(f"dummy_input names {unknown}, which are not parameters of the model's forward "
                         f"{names}: a dict dummy_input maps parameter names to tensors (keyword arguments). "
                         "For a forward that takes one dict argument, pass dummy_input=(the_dict,)")
    last = max(names.index(k) for k in given)
    args = []
    for p in params[:last + 1]:
        if p.target in given:
            args.append(given[p.target])
        elif p.args:  # the parameter's default value
            args.append(p.args[0])
        else:
            raise ValueError(f"dummy_input has no value for '{p.target}', a parameter of the model's forward "
                             f"{names} without a default; add it to the dict")
    return tuple(args)


def bind_dummy_input(gm: fx.GraphModule, dummy_input, batch_size: int | None) -> tuple:
    """Positional forward arguments from ``dummy_input`` (a tensor, a tuple of forward arguments, an input
    shape, or a dict of parameter name -> tensor), with ``batch_size`` applied; detached copies on the CPU."""
    check_batch_size(batch_size)
    if dummy_input is None:
        raise ValueError("convert_export needs dummy_input: a tensor, a tuple of tensors, a dict of forward "
                         "parameter name -> tensor, or an input shape such as (1, 3, 224, 224)")
    if isinstance(dummy_input, (tuple, list, torch.Size)) and dummy_input and all(
            isinstance(d, int) and not isinstance(d, bool) for d in dummy_input):
        if min(dummy_input) < 1:
            raise ValueError(f"dummy_input {tuple(dummy_input)} is read as an input shape; every dimension must "
                             "be positive")
        dummy_input = torch.randn(*dummy_input)
    if isinstance(dummy_input, dict):
        args = _bind_keywords(gm, dummy_input)
    else:
        args = (dummy_input,) if isinstance(dummy_input, torch.Tensor) else tuple(dummy_input)

    def prepare(t: torch.Tensor) -> torch.Tensor:
        if batch_size is not None and t.dim():
            t = t[:1].expand(batch_size, *t.shape[1:])
        return t.detach().cpu().clone()  # the caller's tensors are never touched
    return pytree.tree_map_only(torch.Tensor, prepare, args)


def fresh_copy(args: tuple) -> tuple:
    """New containers and tensors with the same values, for one forward run: a forward may add keys to a dict
    argument (detection models) or write into its tensors, and the bound arguments must stay as given."""
    return pytree.tree_map(lambda leaf: leaf.clone() if isinstance(leaf, torch.Tensor) else leaf, args)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _traced_shape(gm: fx.GraphModule, node: fx.Node) -> tuple[int, ...] | None:
    """The input shape the model was calibrated with (its input quantizer's last calibration batch) or traced
    with, where known."""
    from ..fake_quantize import QuantizeBase
    for user in node.users:
        mod = gm.get_submodule(user.target) if user.op == "call_module" else None
        if isinstance(mod, QuantizeBase) and not mod.is_weight and mod.observed_shape is not None:
            return mod.observed_shape
    for key in ("tensor_meta", "val", "example_value"):
        shape = getattr(node.meta.get(key), "shape", None)
        if shape is not None:
            return tuple(int(d) for d in shape)
    return None


def bad_input_error(gm: fx.GraphModule, args: tuple, names: list[str], exc: Exception) -> ValueError:
    """A ValueError for a dummy input the model cannot run: what was given, what the model expects."""
    given = ", ".join(f"{n}: {_shape(t)}" for n, (_, t) in zip(names, leaves(args))) or "no tensors"
    params = forward_parameters(gm)
    known = {p.target: _traced_shape(gm, p) for p in params}
    expected = ", ".join(f"{k}: {v}" for k, v in known.items() if v is not None)
    first = (str(exc).strip().splitlines() or [""])[0]
    return ValueError(
        f"the model's forward fails on dummy_input ({given}) with {type(exc).__name__}: {first}. "
        + (f"The model was calibrated or traced with {expected}. " if expected else "")
        + f"Its forward takes {[p.target for p in params]}. Pass a dummy_input shaped like a calibration batch "
        "(a tensor, a tuple with one entry per forward argument, or a dict of parameter name -> tensor); "
        "batch_size sets the batch dimension of the file")
