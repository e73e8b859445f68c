"""Pass 1 of export: a copy of the prepared model with BN folded and every fake quantizer frozen
into a constant-parameter :class:`QDQ`."""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from ..fake_quantize import QuantizeBase
from ..nn.qat import FusedQATModule
from ..nn.qat.modules import deployed_bias
from .qdq import QDQ
from .qparams import collect_qparams, quantizer_call_sites, weight_quantizers

STUB_PREFIX = "qdq__"


def _qdq(fq: QuantizeBase, weight_dtype: str) -> QDQ:
    scale, zp = fq.qparams()
    as_uint8 = weight_dtype == "uint8"
    return QDQ(scale, zp, fq.quant_min, fq.quant_max, fq.scheme.signed, fq.ch_axis, as_uint8=as_uint8)


@torch.no_grad()
def freeze_for_export(gm: fx.GraphModule, weight_dtype: str = "auto") -> tuple[fx.GraphModule, dict[str, str], dict]:
    """Returns (export module, {stub module name: canonical tensor name}, qparams JSON dict). ``gm`` is not modified.

    weight_dtype: container of signed weights: "int8" (the scheme's own integers, zero point 0; "auto" is the
    same) or "uint8" (shifted by 128: onnxruntime on x86 CPUs without VNNI, see qdq.py).
    """
    if weight_dtype not in ("auto", "int8", "uint8"):
        raise ValueError(f"weight_dtype must be 'auto', 'int8' or 'uint8', got {weight_dtype!r}")
    m = copy.deepcopy(gm).eval()  # everything below changes the copy only, never the caller's model
    qparams = collect_qparams(m)  # raises on uncalibrated activations; initialises weight quantizers
    for name, layer in list(weight_quantizers(m)):
        fq = layer.weight_fake_quant
        w, b = layer.quantized_weight_source()
        qdq = _qdq(fq, weight_dtype)
        w = qdq.clip_constant(fq.export_transform(w))
        layer.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        if b is not None:
            if not isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
                b = deployed_bias(layer, b)  # on the int32 grid, as the integer kernel adds it
            layer.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
        layer.link_input_quantizer(None)
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
        m.add_submodule(stub, _qdq(fq, weight_dtype) if fq.is_weight else QDQ.from_quantizer(fq))
        node.target = stub
        stub_names[stub] = tensor
    m.delete_all_unused_submodules()
    m.recompile()
    assert not any(isinstance(x, QuantizeBase) for x in m.modules())
    return m, stub_names, qparams
