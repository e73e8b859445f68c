"""Per-layer quantization settings (mixed precision): ``prepare_custom_config_dict['module_qconfig']``.

    {"features.0.0": {"w_qscheme": {"bit": 8}, "a_qscheme": {"bit": 8}},
     "classifier.1": {"w_qscheme": {"bit": 8}, "a_qscheme": {"bit": 8}}}

Each key names a quantized layer of the traced model (a conv / linear / embedding, fused or not); each value holds
``extra_qconfig_dict`` keys laid over the model-wide configuration. The layer's weight quantizer, the quantizers of
its inputs and the quantizer of its output are built with that configuration when ``ModelQuantizer.prepare`` places
them: each quantizer is built once, and where several keys reach one quantizer the last key wins. Quantizers are
shared along the graph (a tensor has one grid, whoever reads it), so an input quantizer that a neighbour also reads
changes for that neighbour too: "8-bit input" means the tensor is deployed on an 8-bit grid. A key may also name a
block (a module holding quantized layers, such as mobilenet_v2's ``features.3``): each of its layers gets the setting.

Under TSQAT, ``{"a_qscheme": {"bit": 16}}`` makes a layer W8A16 (AIMET-style 16-bit activations, uint16 on
0..65535); convert_export writes those tensors as 16-bit QuantizeLinear/DequantizeLinear at opset_version=21.

The usual use: W4A4 with the first and the last layer at 8 bits. A 4-bit classifier output has 16 levels for
all logits, which turns many top-1 decisions into ties; a 4-bit input image loses most of its detail.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Iterable, Mapping

from torch import fx

from .qconfig import QConfig

__all__ = ["module_qconfigs", "layer_qconfig", "check_layer_names", "activation_qconfigs"]


def module_qconfigs(backend_qconfig: Mapping[str, Any], extra_qconfig: Mapping[str, Any] | None,
                    overrides: Mapping[str, Mapping[str, Any]], allowed_bits: range,
                    wide_activation_bits: tuple[int, ...] = ()) -> dict[str, QConfig]:
    """``module_qconfig`` as {layer or block name: its QConfig}, each laid over the model-wide settings and checked
    against the backend's bit widths (the error names the key)."""
    if not isinstance(overrides, Mapping):
        raise ValueError("module_qconfig must map layer names to extra_qconfig_dict-style dicts, e.g. "
                         "{'features.0.0': {'w_qscheme': {'bit': 8}, 'a_qscheme': {'bit': 8}}}")
    out = {}
    for name, over in overrides.items():
        merged = dict(extra_qconfig or {})
        for key in ("w_qscheme", "a_qscheme"):
            if key in over:
                merged[key] = {**dict(merged.get(key) or {}), **dict(over[key])}
        merged.update({k: v for k, v in over.items() if k not in ("w_qscheme", "a_qscheme")})
        qc = QConfig.from_dict(backend_qconfig, merged)
        try:
            qc.check_bits(allowed_bits, wide_activation_bits)
        except ValueError as exc:
            raise ValueError(f"module_qconfig['{name}']: {exc}") from None
        out[name] = qc
    return out


def _covers(key: str, layer: str) -> bool:
    """The key names the layer, or a block holding it."""
    return layer == key or layer.startswith(key + ".")


def layer_qconfig(layer: str, qconfigs: Mapping[str, QConfig]) -> QConfig | None:
    """The QConfig of the last key naming the layer or a block holding it; None: the model-wide one applies."""
    found = None
    for key, qc in qconfigs.items():
        if _covers(key, layer):
            found = qc
    return found


def check_layer_names(qconfigs: Mapping[str, QConfig], layers: list[str]) -> None:
    """Every key names a quantized layer, or a block holding one; otherwise say which names come close."""
    for key in qconfigs:
        if not any(_covers(key, layer) for layer in layers):
            close = difflib.get_close_matches(key, layers, n=3)
            raise ValueError(f"module_qconfig: '{key}' is not a quantized layer of the traced model"
                             + (f"; did you mean {close}?" if close else f"; quantized layers: {layers[:8]} ..."))


def _layer_activation_quantizers(gm: fx.GraphModule, layer: str,
                                 quantizer: Callable[[fx.Node], str | None]) -> list[str]:
    """The activation quantizers feeding the layer's node(s), and the first one after it (its output's; a fused
    activation or a view may sit in between). ``quantizer(node)``: the name of the quantizer a node calls, or None."""
    found: list[str] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target != layer:
            continue
        found += [t for t in map(quantizer, node.all_input_nodes) if t]
        frontier = [node]
        while frontier:  # breadth first through single-input ops, stopping at the first level with a quantizer
            users = [u for n in frontier for u in n.users]
            outs = [t for t in map(quantizer, users) if t]
            if outs:
                found += outs
                break
            frontier = [u for u in users if len(u.all_input_nodes) == 1]
    return list(dict.fromkeys(found))


def activation_qconfigs(gm: fx.GraphModule, qconfigs: Mapping[str, QConfig], layers: Iterable[str],
                        quantizer: Callable[[fx.Node], str | None]) -> dict[str, QConfig]:
    """{activation quantizer name: QConfig} for the inputs and outputs of the layers ``qconfigs`` names (keys in
    order: a later key wins), read from the graph once every activation quantizer is placed."""
    layers = list(layers)
    out: dict[str, QConfig] = {}
    for key, qc in qconfigs.items():
        for layer in (name for name in layers if _covers(key, name)):
            out.update(dict.fromkeys(_layer_activation_quantizers(gm, layer, quantizer), qc))
    return out
