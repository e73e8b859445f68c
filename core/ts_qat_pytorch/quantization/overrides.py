"""Per-layer quantization settings (mixed precision): ``prepare_custom_config_dict['module_qconfig']``.

    {"features.0.0": {"w_qscheme": {"bit": 8}, "a_qscheme": {"bit": 8}},
     "classifier.1": {"w_qscheme": {"bit": 8}, "a_qscheme": {"bit": 8}}}

Each key names a quantized layer of the traced model (a conv / linear / embedding, fused or not); each value holds
``extra_qconfig_dict`` keys laid over the model-wide configuration. The layer's weight quantizer, the quantizers of
its inputs and the quantizer of its output are rebuilt with that configuration. Quantizers are shared along the
graph (a tensor has one grid, whoever reads it), so an input quantizer that a neighbour also reads changes for
that neighbour too: "8-bit input" means the tensor is deployed on an 8-bit grid. A key may also name a block
(a module holding quantized layers, such as mobilenet_v2's ``features.3``): each of its layers gets the setting.

Under TSQAT, ``{"a_qscheme": {"bit": 16}}`` makes a layer W8A16 (AIMET-style 16-bit activations, uint16 on
0..65535); convert_export writes those tensors as 16-bit QuantizeLinear/DequantizeLinear at opset_version=21.

The usual use: W4A4 with the first and the last layer at 8 bits. A 4-bit classifier output has 16 levels for
all logits, which turns many top-1 decisions into ties; a 4-bit input image loses most of its detail.
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping

from torch import fx

from ..fake_quantize import QuantizeBase
from .qconfig import QConfig

__all__ = ["apply_module_qconfig"]


def _rebuilt(old: QuantizeBase, qc: QConfig, weight_channels: int | None) -> QuantizeBase:
    if weight_channels is not None:
        new = qc.weight(channels=weight_channels, ch_axis=old.scheme.ch_axis)
    else:
        new = qc.activation()
    if old.max_scale is not None:  # the bound of a ReLU6-like activation, re-expressed for the new width
        new.max_scale = old.max_scale * (old.quant_max - old.quant_min) / (new.quant_max - new.quant_min)
    new.qualname = old.qualname
    new.shared_sites = old.shared_sites  # a concat's shared quantizer stays shared by the same call sites
    return new


def _activation_quantizers(gm: fx.GraphModule, name: str) -> list[str]:
    """The quantizers feeding the layer's node(s), and the first quantizer after it (its output's; a fused
    activation or a view may sit in between)."""
    def fq_name(n) -> str | None:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), QuantizeBase):
            return str(n.target)
        return None

    found: list[str] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target != name:
            continue
        found += [t for t in map(fq_name, node.all_input_nodes) if t and not gm.get_submodule(t).is_weight]
        frontier = [node]
        while frontier:  # breadth first through single-input ops, stopping at the first level with a quantizer
            users = [u for n in frontier for u in n.users]
            outs = [t for t in map(fq_name, users) if t]
            if outs:
                found += outs
                break
            frontier = [u for u in users if len(u.all_input_nodes) == 1]
    return list(dict.fromkeys(found))


def apply_module_qconfig(gm: fx.GraphModule, backend_qconfig: Mapping[str, Any],
                         extra_qconfig: Mapping[str, Any] | None, overrides: Mapping[str, Mapping[str, Any]],
                         allowed_bits: range, wide_activation_bits: tuple[int, ...] = ()) -> None:
    """Rebuild the quantizers of each named layer with its own configuration (see the module docstring)."""
    if not isinstance(overrides, Mapping):
        raise ValueError("module_qconfig must map layer names to extra_qconfig_dict-style dicts, e.g. "
                         "{'features.0.0': {'w_qscheme': {'bit': 8}, 'a_qscheme': {'bit': 8}}}")
    layers = [n for n, m in gm.named_modules() if hasattr(m, "weight_fake_quant")]
    for name, over in overrides.items():
        # a block (a module holding quantized layers, e.g. an inverted residual) names each of its layers
        targets = [name] if name in layers else [n for n in layers if n.startswith(name + ".")]
        if not targets:
            close = difflib.get_close_matches(name, layers, n=3)
            raise ValueError(f"module_qconfig: '{name}' is not a quantized layer of the traced model"
                             + (f"; did you mean {close}?" if close else f"; quantized layers: {layers[:8]} ..."))
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
        for target in targets:
            _apply(gm, target, qc)


def _apply(gm: fx.GraphModule, name: str, qc: QConfig) -> None:
    """Rebuild one layer's weight, input and output quantizers with ``qc``."""
    layer = gm.get_submodule(name)
    old_w = layer.weight_fake_quant
    channels = layer.weight.shape[old_w.scheme.ch_axis] if old_w.scheme.per_channel else 1
    layer.weight_fake_quant = _rebuilt(old_w, qc, channels)
    replaced = {}
    for t in _activation_quantizers(gm, name):
        old = gm.get_submodule(t)
        new = _rebuilt(old, qc, None)
        gm.add_submodule(t, new)  # replaces the module; the graph calls it by name
        replaced[id(old)] = new
    for m in gm.modules():  # layers that keep a reference to their input quantizer (nn/qat: deployed_bias)
        ref = m.__dict__.get("input_fake_quant")
        if ref is not None and id(ref) in replaced:
            m.__dict__["input_fake_quant"] = replaced[id(ref)]
