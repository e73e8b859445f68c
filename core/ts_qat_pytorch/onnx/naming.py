"""Pass 3 of export: name each quantized ONNX tensor as the parameter JSON does."""
from __future__ import annotations

import re

import onnx

from .freeze import STUB_PREFIX

_STUB = re.compile(re.escape(STUB_PREFIX) + r"([A-Za-z0-9_]+)")


def _stub_of(node: onnx.NodeProto) -> str | None:
    texts = [node.name] + [p.value for p in node.metadata_props if p.key in ("namespace", "pkg.torch.onnx.name_scopes")]
    for t in texts:
        m = _STUB.search(t)
        if m:
            return STUB_PREFIX + m.group(1)
    return None


def rename_tensor(model: onnx.ModelProto, old: str, new: str) -> None:
    g = model.graph
    for n in g.node:
        for i, v in enumerate(n.input):
            if v == old:
                n.input[i] = new
        for i, v in enumerate(n.output):
            if v == old:
                n.output[i] = new
    for coll in (g.initializer,):
        for t in coll:
            if t.name == old:
                t.name = new
    for coll in (g.output, g.value_info, g.input):
        for v in coll:
            if v.name == old:
                v.name = new


def apply_canonical_names(model: onnx.ModelProto, stub_names: dict[str, str]) -> dict[str, str]:
    """Rename the input of each activation QuantizeLinear to its canonical name. Returns {canonical: onnx name}
    for every stub found, and raises if a stub has no QuantizeLinear (the export lost a quantizer).

    Graph inputs and outputs keep their names: a quantized graph input or output is known by that name, and
    a canonical name taken by a graph input or output gets the suffix ``__quantized``."""
    g = model.graph
    interface = {v.name for v in list(g.input) + list(g.output)}  # the names users feed and fetch: never renamed
    all_names = {v for n in g.node for v in list(n.input) + list(n.output)} | {t.name for t in g.initializer}
    found: dict[str, str] = {}
    producer = {o: n for n in g.node for o in n.output}
    for node in list(g.node):
        if node.op_type != "QuantizeLinear":
            continue
        stub = _stub_of(node)
        if stub is None or stub not in stub_names:
            continue
        have = node.input[0]
        # narrow (< 8 bit) quantizers clip first: name the tensor that enters the stub, not the clipped one
        while have in producer and _stub_of(producer[have]) == stub and producer[have].input:
            have = producer[have].input[0]
        want = stub_names[stub]
        if want in interface and have != want:  # e.g. a dict output "out" and the layer "out" it dequantizes
            want += "__quantized"
        if have != want and have not in interface:
            if want in all_names:  # make room: the exporter used our name for another tensor
                rename_tensor(model, want, want + "__onnx")
                all_names.add(want + "__onnx")
            rename_tensor(model, have, want)
            all_names.add(want)
            have = want
        found[stub_names[stub]] = have
    missing = sorted(set(stub_names.values()) - set(found))
    if missing:
        raise RuntimeError(f"the exported ONNX lost the QuantizeLinear of {missing[:5]}: please report this "
                           "with the model; try exporter='legacy' meanwhile")
    return found
