"""The quantization-parameter JSON: one entry per quantized tensor, keyed by its ONNX tensor name.

Activations are named after the traced node whose output is quantized (graph inputs keep their
input names); weights after their parameter (``<layer>.weight``). ``convert_export`` renames the
exported ONNX tensors to exactly these names, so the JSON and the ONNX file agree.
"""
from __future__ import annotations

import json
from typing import Any

import torch
from torch import fx

from ..fake_quantize import QuantizeBase
from ..nn.qat import QATMixin

FORMAT = "ts_qat_pytorch.qparams"
VERSION = 1


def quantizer_call_sites(gm: fx.GraphModule):
    """(fx node calling a quantizer, the quantizer, canonical name of the tensor it quantizes)."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, QuantizeBase):
                yield node, mod, node.args[0].name


def weight_quantizers(gm: fx.GraphModule):
    """(layer name, layer) for every QAT layer with a weight quantizer."""
    for name, mod in gm.named_modules():
        if isinstance(mod, QATMixin) and isinstance(getattr(mod, "weight_fake_quant", None), QuantizeBase):
            yield name, mod


def entry(fq: QuantizeBase, kind: str) -> dict[str, Any]:
    scale, zp = fq.qparams()
    s = fq.scheme
    return {
        "kind": kind, "quantizer": fq.qualname, "type": type(fq).__name__,
        "scale": [float(v) for v in scale], "zero_point": [int(v) for v in zp],
        "bit": s.bit, "quant_min": fq.quant_min, "quant_max": fq.quant_max,
        "per_channel": s.per_channel, "axis": fq.ch_axis if s.per_channel else None,
        "symmetric": s.symmetry, "signed": s.signed, "pot_scale": s.pot_scale,

    }


@torch.no_grad()
def collect_qparams(gm: fx.GraphModule) -> dict[str, Any]:
    """All quantized tensors of a prepared model. Raises if an activation quantizer was never calibrated."""
    tensors: dict[str, Any] = {}
    missing = []
    for node, fq, tensor in quantizer_call_sites(gm):
        if fq.non_float and not fq.initialized:
            continue  # only ever saw integer tensors (token ids, masks): nothing to quantize
        if not fq.initialized:
            if fq.is_weight and node.args[0].op == "get_attr":
                fq.init_from_weight(gm.get_parameter(node.args[0].target))
            else:
                missing.append(fq.qualname or node.target)
                continue
        tensors[tensor] = entry(fq, "weight" if fq.is_weight else "activation")
    for name, layer in weight_quantizers(gm):
        fq = layer.weight_fake_quant
        if not fq.initialized:
            fq.init_from_weight(layer.quantized_weight_source()[0])
        tensors[f"{name}.weight"] = entry(fq, "weight")
    if missing:
        shown = ", ".join(sorted(set(missing))[:8]) + (" ..." if len(set(missing)) > 8 else "")
        raise RuntimeError(
            f"{len(set(missing))} activation quantizer(s) were never calibrated ({shown}): the model would be "
            "exported with meaningless scales. Calibrate first: model.eval(); enable_calibration(model); "
            "run a few batches; then enable_quantization(model).")
    return {"format": FORMAT, "version": VERSION, "backend": getattr(gm, "qat_backend", None),
            "tensors": tensors}


def write_qparams_json(qparams: dict[str, Any], path: str) -> None:
    from ..utils.utils import atomic_write_bytes
    atomic_write_bytes(path, (json.dumps(qparams, indent=1) + "\n").encode())
