"""``convert_export``: fold BN, freeze fake quantizers into QDQ, export ONNX, write the qparams JSON,
and check the result in onnxruntime.

    convert_export(model, dummy_input, onnx_path, opset_version=18, batch_size=None)

model          a prepared (and calibrated) model from ``prepare_by_platform``; DDP wrappers are unwrapped.
               It is not modified.
dummy_input    a tensor, a tuple (one entry per forward argument; an entry may be a dict or tuple of tensors),
               a dict of forward parameter name -> tensor (keyword arguments), or an input shape such as
               ``(1, 3, 224, 224)`` (random data of that shape is used). It is not modified.
               ONNX inputs and outputs are the tensors in it and in the model's output, flattened depth
               first (dict keys in insertion order) and named by their path (onnx/signature.py): ``x``,
               ``batch_image``; ``output``, ``output_0_1``, a dict's keys (``out``, ``aux``).
onnx_path      where the ONNX file goes; the JSON goes to ``qparams_path`` (default: next to it,
               ``<name>_qparams.json``).
opset_version  13..21, default 18 (the manual's); 21 with 16-bit activations (uint16 QDQ, onnx/wide.py).
batch_size     the batch dimension baked into the file (a positive int; default: the dummy input's);
               ``dynamic_batch=True`` makes it symbolic instead (legacy exporter).
exporter       "dynamo" (torch's current exporter, default) or "legacy" (see onnx/exporter.py).
weight_dtype   how signed weights are stored: "int8" (default; "auto" is the same): the scheme's integers with
               zero point 0, as integer initializers read by a DequantizeLinear (onnx/storage.py); "uint8":
               shifted by 128, for onnxruntime on x86 CPUs without VNNI (onnx/qdq.py says why; the
               verification warns on such a CPU). The JSON records each tensor's storage (onnx_dtype,
               onnx_zero_point).
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
from .onnx.qdq import QDQ
from .onnx.storage import (constants_as_initializers, explicit_zero_points, fold_weight_transposes,
                           store_weights_as_integers, weight_layouts)
from .onnx.qparams import write_qparams_json
from .onnx import signature
from .onnx import verify as verify_mod
from .onnx.verify import INTEGER_MATMUL_KERNELS, check_model, count_integer_kernels, run_onnx
from .onnx.wide import check_export_opset, widen_quantizers
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
    cpu_may_saturate: bool = False             # int8 weights on an x86 CPU without VNNI (see weight_dtype)
    float_batch_norms: dict[str, str] = field(default_factory=dict)  # BatchNorms left unfolded -> why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _names(given: Sequence[str] | None, default: list[str], what: str) -> list[str]:
    """``given`` names, or the default ones; either way one unique name per tensor."""
    names = list(given) if given else default
    if len(names) != len(default):
        raise ValueError(f"{what} has {len(names)} names but the model has {len(default)} such tensors "
                         f"(default names {default}); give one name per tensor or leave {what} out")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} {names} repeats a name; pass {what}= with unique names")
    return names


def _file_path(path, what: str, example: str) -> str:
    """``path`` as a str; a directory is refused up front, not by the final rename after all the work."""
    path = os.fspath(path)
    if os.path.isdir(path) or not os.path.basename(path):
        raise ValueError(f"{what} {path!r} is a directory; give a file path such as {os.path.join(path, example)!r}")
    return path


def _reference_outputs(frozen: fx.GraphModule, args: tuple, input_names: list[str], prepared: fx.GraphModule):
    try:
        with torch.no_grad():
            return frozen(*signature.fresh_copy(args))  # a forward may add keys to a dict input
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise signature.bad_input_error(prepared, args, input_names, exc) from exc


def _output_scales(frozen: fx.GraphModule, paths: list[tuple]) -> list[float | None]:
    """The quantization step of each output (None for a float output), found by its path in the graph's output."""
    out_node = next(n for n in frozen.graph.nodes if n.op == "output")
    producers = dict(signature.leaves(out_node.args[0], fx.Node))
    scales = []
    for path in paths:
        node = producers.get(path)
        stub = frozen.get_submodule(node.target) if isinstance(node, fx.Node) and node.op == "call_module" else None
        scales.append(float(torch.as_tensor(stub.scale).max()) if isinstance(stub, QDQ) else None)
    return scales


def convert_export(model: torch.nn.Module, dummy_input=None, onnx_path: str = "model_quantization.onnx",
                   opset_version: int = 18, batch_size: int | None = None, qparams_path: str | None = None,
                   exporter: str = "dynamo", dynamic_batch: bool = False,
                   input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                   verify: bool = True, weight_dtype: str = "int8") -> ExportResult:
    gm = getattr(model, "module", model)
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"convert_export needs a model prepared by prepare_by_platform, got {type(gm).__name__}")
    check_export_opset(gm, opset_version)  # 16-bit activations need opset 21: refuse before any work
    onnx_path = _file_path(onnx_path, "onnx_path", "model.onnx")
    stem = os.path.splitext(os.path.basename(onnx_path))[0]
    what = "qparams_path" if qparams_path else "qparams_path (default: next to onnx_path)"
    qparams_path = _file_path(qparams_path or os.path.splitext(onnx_path)[0] + "_qparams.json", what,
                              f"{stem}_qparams.json")
    args = signature.bind_dummy_input(gm, dummy_input, batch_size)
    frozen, stub_names, qparams = freeze_for_export(gm, weight_dtype)  # a copy: the caller's model is untouched
    frozen = frozen.cpu().eval()
    inputs = signature.leaves(args)
    parameters = [p.target for p in signature.forward_parameters(frozen)]
    input_names = _names(input_names, signature.input_names(parameters, [p for p, _ in inputs]), "input_names")
    ref = signature.leaves(_reference_outputs(frozen, args, input_names, gm))
    output_names = _names(output_names, signature.output_names([p for p, _ in ref]), "output_names")

    os.makedirs(os.path.dirname(os.path.abspath(onnx_path)), exist_ok=True)
    tmp_path = onnx_path + ".partial"
    try:
        # a fresh copy: the graph's inputs are the dummy's leaves as given, not keys the forward added
        model_proto, used = _exporter.export(frozen, signature.fresh_copy(args), tmp_path, opset_version,
                                             input_names, output_names, exporter=exporter, dynamic_batch=dynamic_batch)
    finally:
        for p in (tmp_path, tmp_path + ".data"):
            if os.path.exists(p):
                os.unlink(p)
    onnx_names = apply_canonical_names(model_proto, stub_names)
    widen_quantizers(model_proto, frozen, stub_names)  # 16-bit activations: uint16 / int16 Q/DQ (onnx/wide.py)
    constants_as_initializers(model_proto)
    store_weights_as_integers(model_proto)  # integer weights + DequantizeLinear (onnx/storage.py)
    fold_weight_transposes(model_proto)  # stored as the MatMul reads them (onnx/storage.py)
    int32_biases = quantize_biases(model_proto)  # Conv / Linear biases as int32 + DequantizeLinear (onnx/bias.py)
    gather_before_dequantize(model_proto)  # embeddings: dequantize the looked-up rows, not the table (onnx/gather.py)
    explicit_zero_points(model_proto)  # rknn-toolkit2 needs them (onnx/storage.py)
    model_proto.doc_string = f"QDQ model exported by ts_qat_pytorch (backend {qparams.get('backend')})"
    atomic_write_bytes(onnx_path, model_proto.SerializeToString())

    _record_encoding(frozen, stub_names, qparams)
    # graph inputs and outputs keep their names (onnx/naming.py): key the JSON by the file's names
    qparams["tensors"] = {onnx_names.get(k, k): v for k, v in qparams["tensors"].items()}
    for name, layout in weight_layouts(model_proto).items():  # the file's own layout of each integer weight
        if name in qparams["tensors"]:
            qparams["tensors"][name].update(layout)
    qparams.update(onnx_file=os.path.basename(onnx_path), opset_version=opset_version, exporter=used,
                   inputs=input_names, outputs=output_names, int32_biases=int32_biases)
    write_qparams_json(qparams, qparams_path)

    narrow = [t for t in qparams["tensors"].values() if t["bit"] < 8 and t["kind"] == "activation"]
    if narrow:
        logger.warning("%d activations use %s bits: exported as 8-bit QuantizeLinear/DequantizeLinear with "
                       "the narrow range as a Clip (numerically identical). onnxruntime has no integer kernels for "
                       "them and runs those layers in float; the JSON carries the true bit widths for the "
                       "deployment tool.", len(narrow), sorted({t["bit"] for t in narrow}))
    n_layers = sum(1 for t in qparams["tensors"].values() if t["kind"] == "weight" and not _is_embedding(frozen, t))
    result = ExportResult(onnx_path, qparams_path, used, opset_version, input_names, output_names, n_layers,
                          output_scale=_output_scales(frozen, [p for p, _ in ref]),
                          float_batch_norms=unfolded_batch_norms(frozen))
    if result.float_batch_norms:
        logger.warning("%d BatchNorm layers could not fold into a conv / linear and run in float between integer "
                       "layers: %s", len(result.float_batch_norms),
                       "; ".join(f"{k}: {v}" for k, v in list(result.float_batch_norms.items())[:8])
                       + (" ..." if len(result.float_batch_norms) > 8 else ""))
    if verify:
        full_int8 = any(t["kind"] == "weight" and t.get("onnx_dtype") == "int8" and t["quant_max"] - t["quant_min"] > 127
                        for t in qparams["tensors"].values())
        result.cpu_may_saturate = full_int8 and verify_mod.cpu_has_vnni() is False
        _verify(result, {n: t.numpy() for n, (_, t) in zip(input_names, inputs)}, [t for _, t in ref])
    return result


def _verify(result: ExportResult, feeds: dict[str, np.ndarray], ref: list[torch.Tensor]) -> None:
    """onnx.checker, then every output of the file in onnxruntime against PyTorch's."""
    file_outputs = [o.name for o in check_model(result.onnx_path).graph.output]
    if file_outputs != result.output_names:
        raise RuntimeError(f"the exported file has outputs {file_outputs}, expected {result.output_names}: please "
                           "report this with the model; try exporter='legacy' meanwhile")
    outs = run_onnx(result.onnx_path, feeds)
    result.max_abs_diff = [float(np.abs(o.astype(np.float64) - r.numpy().astype(np.float64)).max()) if o.size else 0.0
                           for o, r in zip(outs, ref)]
    result.integer_kernels = count_integer_kernels(result.onnx_path)
    result.integer_matmul_kernels = sum(v for k, v in result.integer_kernels.items() if k in INTEGER_MATMUL_KERNELS)
    if result.cpu_may_saturate:
        steps = [d / s if s else d for d, s in zip(result.max_abs_diff, result.output_scale)]
        logger.warning("this CPU has no VNNI (AVX512-VNNI / AVX-VNNI): onnxruntime's uint8 x int8 kernels add pairs "
                       "of products in int16 and can saturate with full 8-bit int8 weights (here max |ORT - PyTorch| "
                       "= %s output steps). The file is right for NPUs and VNNI CPUs; for onnxruntime on this machine "
                       "export with weight_dtype='uint8', or train 7-bit weights with the ONNXRuntime backend.",
                       ["%.3g" % v for v in steps])
    logger.info("exported %s (%s exporter, opset %d): %d quantized layers, integer kernels %s, "
                "max |ORT - PyTorch| %s", result.onnx_path, result.exporter, result.opset_version,
                result.quantized_layers, result.integer_kernels,
                dict(zip(result.output_names, ["%.3g" % d for d in result.max_abs_diff])))


def _record_encoding(frozen: fx.GraphModule, stub_names: dict[str, str], qparams: dict) -> None:
    """Add each tensor's storage in the file (uint8 / int8 and the stored zero point) to the JSON."""
    stubs = {tensor: frozen.get_submodule(stub) for stub, tensor in stub_names.items()}
    for name, mod in frozen.named_modules():
        if isinstance(getattr(mod, "weight_fake_quant", None), QDQ):
            stubs[f"{name}.weight"] = mod.weight_fake_quant
    for tensor, entry in qparams["tensors"].items():
        q = stubs.get(tensor)
        if isinstance(q, QDQ):
            zp = q.zero_point.tolist() if isinstance(q.zero_point, torch.Tensor) else [q.zero_point]
            entry.update(onnx_dtype=q.onnx_dtype, onnx_zero_point=[int(z) for z in zp])


def unfolded_batch_norms(gm: fx.GraphModule) -> dict[str, str]:
    """{BatchNorm layer: why it did not fold} for every BatchNorm the fusion left standing in ``gm``."""
    reasons = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target),
                                                      torch.nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0] if node.args else None
        while isinstance(src, fx.Node) and src.op == "call_module" and isinstance(gm.get_submodule(src.target), QDQ):
            src = src.args[0]  # the tensor the quantizer reads
        layer = gm.get_submodule(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        if isinstance(layer, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
            why = f"'{src.target}' feeds other layers too ({len(src.users)} users): its output is needed unnormalised"
        else:
            what = type(layer).__name__ if layer is not None else getattr(src, "target", src)
            what = getattr(what, "__name__", what)
            why = (f"its input comes from {what}, not from a conv / linear it could fold into (a BatchNorm before "
                   "its layer, as in pre-activation blocks: BN -> activation -> conv)")
        reasons[str(node.target)] = why
    return reasons


def _is_embedding(gm: fx.GraphModule, entry: dict) -> bool:
    layer = entry["quantizer"].rsplit(".weight_fake_quant", 1)[0]
    try:
        return isinstance(gm.get_submodule(layer), torch.nn.Embedding)
    except AttributeError:
        return False
