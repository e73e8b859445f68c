"""Pass 1 of export: a copy of the prepared model with BN folded and every fake quantizer frozen
into a constant-parameter :class:`QDQ`."""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from ..fake_quantize import QuantizeBase
from ..nn.qat import FusedQATModule
from .qdq import QDQ
from .qparams import collect_qparams, quantizer_call_sites, weight_quantizers

STUB_PREFIX = "qdq__"


@torch.no_grad()
def freeze_for_export(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, str], dict]:
    """Returns (export module, {stub module name: canonical tensor name}, qparams JSON dict)."""
    qparams = collect_qparams(gm)  # raises on uncalibrated activations; initialises weight quantizers
    m = copy.deepcopy(gm).eval()
    for name, layer in list(weight_quantizers(m)):
        fq = layer.weight_fake_quant
        w, b = layer.quantized_weight_source()
        qdq = QDQ.from_quantizer(fq)
        w = qdq.clip_constant(fq.export_transform(w))
        layer.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        if b is not None:
            layer.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
        if isinstance(layer, FusedQATModule) and layer.bn is not None:
            layer.bn = None
        layer.weight_fake_quant = qdq
    stub_names: dict[str, str] = {}
    for node, fq, tensor in list(quantizer_call_sites(m)):
        stub = STUB_PREFIX + node.name
        if tensor not in qparams["tensors"]:  # integer-only input: no quantization
            m.add_submodule(stub, nn.Identity())
            node.target = stub
            continue
        m.add_submodule(stub, QDQ.from_quantizer(fq))
        node.target = stub
        stub_names[stub] = tensor
    m.delete_all_unused_submodules()
    m.recompile()
    assert not any(isinstance(x, QuantizeBase) for x in m.modules())
    return m, stub_names, qparams
