"""``convert_export``: fold BN, freeze fake quantizers into QDQ, export ONNX, write the qparams JSON,
and check the result in onnxruntime.

    convert_export(model, dummy_input, onnx_path, opset_version=18, batch_size=None)

model          a prepared (and calibrated) model from ``prepare_by_platform``; DDP wrappers are unwrapped.
               It is not modified.
dummy_input    a tensor, a tuple of tensors (one per forward argument), or an input shape such as
               ``(1, 3, 224, 224)`` (random data of that shape is used).
onnx_path      where the ONNX file goes; the JSON goes to ``qparams_path`` (default: next to it,
               ``<name>_qparams.json``).
opset_version  13..21, default 18 (the manual's).
batch_size     the batch dimension baked into the file (default: the dummy input's); ``dynamic_batch=True``
               makes it symbolic instead (legacy exporter).
exporter       "dynamo" (torch's current exporter, default) or "legacy" (see onnx/exporter.py).
weight_dtype   how signed weights are stored: "auto" (default: uint8 shifted by 128 for full 8-bit weights,
               exact in onnxruntime on every x86 CPU; int8 for weights of 7 bits or fewer), "int8", "uint8".
               The JSON records the file's encoding per tensor (onnx_dtype, onnx_zero_point).
verify         run onnx.checker and onnxruntime on the result and compare with PyTorch (default True).
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import fx

from .onnx import exporter as _exporter
from .onnx.bias import quantize_biases
from .onnx.gather import gather_before_dequantize
from .onnx.freeze import freeze_for_export
from .onnx.naming import apply_canonical_names
from .onnx.qparams import write_qparams_json
from .onnx.verify import INTEGER_MATMUL_KERNELS, check_model, count_integer_kernels, run_onnx
from .utils.utils import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = ["convert_export", "ExportResult"]


@dataclass
class ExportResult:
    onnx_path: str
    qparams_path: str
    exporter: str
    opset_version: int
    input_names: list[str]
    output_names: list[str]
    quantized_layers: int                      # conv / linear layers with quantized weights
    integer_kernels: dict[str, int] = field(default_factory=dict)  # after ORT graph optimisation
    integer_matmul_kernels: int = 0            # the conv / gemm / matmul part of integer_kernels
    max_abs_diff: list[float] = field(default_factory=list)  # ORT vs PyTorch, per output
    output_scale: list[float | None] = field(default_factory=list)  # quantization step of each output

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _make_args(dummy_input, batch_size: int | None) -> tuple[torch.Tensor, ...]:
    if dummy_input is None:
        raise ValueError("convert_export needs dummy_input: a tensor, a tuple of tensors, or an input shape "
                         "such as (1, 3, 224, 224)")
    if isinstance(dummy_input, (tuple, list, torch.Size)) and all(isinstance(d, int) for d in dummy_input):
        dummy_input = torch.randn(*dummy_input)
    args = (dummy_input,) if isinstance(dummy_input, torch.Tensor) else tuple(dummy_input)
    if batch_size is not None:
        args = tuple(a[:1].expand(batch_size, *a.shape[1:]).contiguous() if isinstance(a, torch.Tensor) and a.dim()
                     else a for a in args)
    return tuple(a.detach().cpu() if isinstance(a, torch.Tensor) else a for a in args)


def _output_scales(gm: fx.GraphModule) -> list[float | None]:
    from .fake_quantize import QuantizeBase
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = out_node.args[0]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    scales = []
    for o in outs:
        mod = gm.get_submodule(o.target) if isinstance(o, fx.Node) and o.op == "call_module" else None
        scales.append(float(mod.qparams()[0].max()) if isinstance(mod, QuantizeBase) and mod.initialized else None)
    return scales


def convert_export(model: torch.nn.Module, dummy_input=None, onnx_path: str = "model_quantization.onnx",
                   opset_version: int = 18, batch_size: int | None = None, qparams_path: str | None = None,
                   exporter: str = "dynamo", dynamic_batch: bool = False,
                   input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                   verify: bool = True, weight_dtype: str = "auto") -> ExportResult:
    gm = getattr(model, "module", model)
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"convert_export needs a model prepared by prepare_by_platform, got {type(gm).__name__}")
    args = _make_args(dummy_input, batch_size)
    frozen, stub_names, qparams = freeze_for_export(gm, weight_dtype)
    frozen = frozen.cpu().eval()
    placeholders = [n.name for n in frozen.graph.nodes if n.op == "placeholder"]
    input_names = list(input_names or placeholders[:len(args)])
    with torch.no_grad():
        ref = frozen(*args)
    ref_list = list(ref) if isinstance(ref, (tuple, list)) else [ref]
    output_names = list(output_names or (["output"] if len(ref_list) == 1 else
                                         [f"output_{i}" for i in range(len(ref_list))]))

    onnx_path = os.fspath(onnx_path)
    os.makedirs(os.path.dirname(os.path.abspath(onnx_path)), exist_ok=True)
    tmp_path = onnx_path + ".partial"
    try:
        model_proto, used = _exporter.export(frozen, args, tmp_path, opset_version, input_names, output_names,
                                             exporter=exporter, dynamic_batch=dynamic_batch)
    finally:
        for p in (tmp_path, tmp_path + ".data"):
            if os.path.exists(p):
                os.unlink(p)
    apply_canonical_names(model_proto, stub_names)
    int32_biases = quantize_biases(model_proto)  # Linear biases as int32 + DequantizeLinear (onnx/bias.py)
    gather_before_dequantize(model_proto)  # embeddings: dequantize the looked-up rows, not the table (onnx/gather.py)
    model_proto.doc_string = f"QDQ model exported by ts_qat_pytorch (backend {qparams.get('backend')})"
    atomic_write_bytes(onnx_path, model_proto.SerializeToString())

    qparams_path = qparams_path or os.path.splitext(onnx_path)[0] + "_qparams.json"
    _record_encoding(frozen, stub_names, qparams)
    qparams.update(onnx_file=os.path.basename(onnx_path), opset_version=opset_version, exporter=used,
                   inputs=input_names, outputs=output_names, int32_biases=int32_biases)
    write_qparams_json(qparams, qparams_path)

    narrow = [t for t in qparams["tensors"].values() if t["bit"] < 8 and t["kind"] == "activation"]
    if narrow:
        logger.warning("%d activations use %s bits: exported as 8-bit QuantizeLinear/DequantizeLinear with "
                       "the narrow range as a Clip (numerically identical). onnxruntime has no integer kernels for "
                       "them and runs those layers in float; the JSON carries the true bit widths for the "
                       "deployment tool.", len(narrow), sorted({t["bit"] for t in narrow}))
    n_layers = sum(1 for t in qparams["tensors"].values() if t["kind"] == "weight" and not _is_embedding(gm, t))
    result = ExportResult(onnx_path, qparams_path, used, opset_version, input_names, output_names, n_layers,
                          output_scale=_output_scales(gm))
    if verify:
        check_model(onnx_path)
        feeds = {n: a.numpy() for n, a in zip(input_names, args) if isinstance(a, torch.Tensor)}
        outs = run_onnx(onnx_path, feeds)
        result.max_abs_diff = [float(np.abs(o - r.detach().numpy()).max()) if o.size else 0.0
                               for o, r in zip(outs, ref_list)]
        result.integer_kernels = count_integer_kernels(onnx_path)
        result.integer_matmul_kernels = sum(v for k, v in result.integer_kernels.items() if k in INTEGER_MATMUL_KERNELS)
        logger.info("exported %s (%s exporter, opset %d): %d quantized layers, integer kernels %s, "
                    "max |ORT - PyTorch| %s", onnx_path, used, opset_version, n_layers, result.integer_kernels,
                    ["%.3g" % d for d in result.max_abs_diff])
    return result


def _record_encoding(frozen: fx.GraphModule, stub_names: dict[str, str], qparams: dict) -> None:
    """Add each tensor's storage in the file (uint8 / int8 and the stored zero point) to the JSON."""
    from .onnx.qdq import QDQ
    stubs = {tensor: frozen.get_submodule(stub) for stub, tensor in stub_names.items()}
    for name, mod in frozen.named_modules():
        if isinstance(getattr(mod, "weight_fake_quant", None), QDQ):
            stubs[f"{name}.weight"] = mod.weight_fake_quant
    for tensor, entry in qparams["tensors"].items():
        q = stubs.get(tensor)
        if isinstance(q, QDQ):
            zp = q.zero_point.tolist() if isinstance(q.zero_point, torch.Tensor) else [q.zero_point]
            entry.update(onnx_dtype="uint8" if q.cmin == 0 else "int8", onnx_zero_point=[int(z) for z in zp])


def _is_embedding(gm: fx.GraphModule, entry: dict) -> bool:
    layer = entry["quantizer"].rsplit(".weight_fake_quant", 1)[0]
    try:
        return isinstance(gm.get_submodule(layer), torch.nn.Embedding)
    except AttributeError:
        return False
